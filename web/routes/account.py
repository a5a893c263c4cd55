"""Email + password accounts: sign-up, verification by mailed link, login with a rate limit, password
reset by mailed link, logout, and the account page (sign-in methods, change password, log out
everywhere).

Ending sessions is how every "sign out" reaches the proxy too: it closes a Control UI socket within
its session sweep once the socket's `sessions` row is gone (proxy/session_watch.py).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from db.models import User
from web import auth
from web.pages import MIN_PASSWORD, client_address, ctx, db_session, db_sessions, form, mail, render, require_user
from web.routes import oauth

router = APIRouter()


def _page(request: Request, name: str, status: int = 200, **values: Any) -> HTMLResponse:
    """Log-in and sign-up pages carry the buttons of the configured OAuth providers."""
    return render(request, name, status, oauth=oauth.buttons(ctx(request).settings), **values)


def _reset_limiter(request: Request) -> auth.LoginLimiter:
    """Reset mails asked per email and per address (created on first use, one per app)."""
    state = request.app.state
    if getattr(state, "reset_limiter", None) is None:
        settings = ctx(request).settings
        state.reset_limiter = auth.LoginLimiter("reset", settings.web_reset_max_requests, settings.web_login_window_s)
    return state.reset_limiter  # type: ignore[no-any-return]


def _password_problem(password: str) -> str | None:
    if len(password) < MIN_PASSWORD or len(password) > 1024:
        return f"Use a password of at least {MIN_PASSWORD} characters."
    return None


@router.get("/signup", response_class=HTMLResponse)
async def signup_page(request: Request) -> Response:
    return _page(request, "signup.html")

@router.post("/signup", response_class=HTMLResponse)
async def signup(request: Request) -> Response:
    settings = ctx(request).settings
    fields = await form(request)
    email = auth.normalize_email(fields.get("email", ""))
    password = fields.get("password", "")
    name = fields.get("name", "").strip()[:255] or None
    if not auth.valid_email(email):
        return _page(request, "signup.html", 400, error="Enter a valid email address.", email=email, name=name)
    if problem := _password_problem(password):
        return _page(request, "signup.html", 400, error=problem, email=email, name=name)
    async with db_session(request) as db:
        existing = await auth.user_by_email(db, email)
        if existing is not None and existing.email_verified is not None:
            # Say the same as for a new address: whether an account exists is not told here.
            await mail(settings, email, "You already have an account",
                            f"Someone tried to sign up with this address. Log in at {settings.web_url}/login\n")
            return render(request, "message.html", title="Check your email",
                          detail=f"We sent a link to {email}. Open it to verify your address.")
        if existing is None:
            existing = User(email=email, name=name, password_hash=auth.hash_password(password))
            db.add(existing)
        else:  # signed up before and never verified: the latest password counts
            existing.password_hash = auth.hash_password(password)
        raw = await auth.new_verification_token(db, email)
        await db.commit()
    link = f"{settings.web_url}/verify?{urlencode({'email': email, 'token': raw})}"
    sent = await mail(settings, email, "Verify your email",
                           f"Welcome to Slopbox.\n\nOpen this link to verify your address:\n{link}\n\n"
                           f"It works once and expires in 24 hours.\n")
    if not sent:
        return render(request, "message.html", 503, title="Email could not be sent",
                      detail="Your account was created but the verification email could not be sent. "
                             "Sign up again with the same address in a moment to get a new link.")
    return render(request, "message.html", title="Check your email",
                  detail=f"We sent a link to {email}. Open it to verify your address.")

@router.get("/verify", response_class=HTMLResponse)
async def verify_page(request: Request, email: str = "", token: str = "") -> Response:
    """The mailed link only shows a button: mail scanners that fetch links do not use up the token."""
    return render(request, "verify.html", email=email[:255], token=token[:255])

@router.post("/verify", response_class=HTMLResponse)
async def verify(request: Request) -> Response:
    fields = await form(request)
    email = auth.normalize_email(fields.get("email", ""))[:255]
    token = fields.get("token", "")
    address = client_address(request)
    if await ctx(request).limiter.blocked(db_sessions(request), email, address):
        return render(request, "error.html", 429, title="Too many attempts",
                      detail="Too many failed attempts. Wait a few minutes and try again.")
    async with db_session(request) as db:
        # The password chosen at sign-up is asked again: someone who signed up with another
        # person's address cannot have that person verify an account whose password they know.
        account = await auth.user_by_email(db, email) if email else None
        if not auth.check_password(account.password_hash if account else None, fields.get("password", "")):
            await ctx(request).limiter.failed(db_sessions(request), email, address)
            return render(request, "verify.html", 401, email=email, token=token[:255],
                          error="That is not the password this account was created with.")
        ok = bool(token) and await auth.use_verification_token(db, email, token)
        user = account if ok else None
        if user is not None:
            user.email_verified = user.email_verified or datetime.now(UTC)
        await db.commit()
    if user is None:
        return render(request, "message.html", 400, title="Link not valid",
                      detail="This verification link was already used, has expired or is wrong. "
                             "Sign up again with the same address to get a new one.")
    return render(request, "message.html", title="Email verified",
                  detail="Your address is verified. You can log in now.", login_link=True)

@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> Response:
    return _page(request, "login.html")

@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    fields = await form(request)
    email = auth.normalize_email(fields.get("email", ""))[:255]
    address = client_address(request)
    if await ctx(request).limiter.blocked(db_sessions(request), email, address):
        return render(request, "error.html", 429, title="Too many attempts",
                      detail="Too many failed logins. Wait a few minutes and try again.")
    async with db_session(request) as db:
        user = await auth.user_by_email(db, email) if email else None
        ok = auth.check_password(user.password_hash if user else None, fields.get("password", ""))
        if not ok or user is None or user.id is None:
            await ctx(request).limiter.failed(db_sessions(request), email, address)
            return _page(request, "login.html", 401, error="Wrong email or password.", email=email)
        if user.email_verified is None:
            return _page(request, "login.html", 403, email=email,
                          error="Verify your email first: open the link we sent you "
                                "(sign up again to get a new one).")
        await ctx(request).limiter.succeeded(db_sessions(request), email)
        token, expires = await auth.create_session(db, user.id)
        await db.commit()
    response = RedirectResponse("/dashboard", status_code=303)
    auth.set_session_cookie(response, ctx(request).session_cookie, token, expires, secure=ctx(request).secure)
    return response

@router.post("/logout")
async def logout(request: Request) -> Response:
    await form(request)
    token = request.cookies.get(ctx(request).session_cookie)
    if token:
        async with db_session(request) as db:
            await auth.delete_session(db, token)
            await db.commit()
    return _signed_out(request, RedirectResponse("/", status_code=303))


def _signed_out(request: Request, response: Response) -> Response:
    response.delete_cookie(ctx(request).session_cookie, path="/", secure=ctx(request).secure, httponly=True,
                           samesite="lax")
    return response


# --- password reset --------------------------------------------------------------------------------

_pending: set[asyncio.Task[bool]] = set()  # reset mails in flight (kept referenced until sent)

@router.get("/forgot", response_class=HTMLResponse)
async def forgot_page(request: Request) -> Response:
    return render(request, "forgot.html")

@router.post("/forgot", response_class=HTMLResponse)
async def forgot(request: Request) -> Response:
    """Says the same whether or not the account exists, and answers before any mail is sent, so
    neither the page nor its timing tells who has an account."""
    fields = await form(request)
    email = auth.normalize_email(fields.get("email", ""))[:255]
    if not auth.valid_email(email):
        return render(request, "forgot.html", 400, error="Enter a valid email address.", email=email)
    limiter, address = _reset_limiter(request), client_address(request)
    if await limiter.blocked(db_sessions(request), email, address):
        return render(request, "error.html", 429, title="Too many requests",
                      detail="Too many password-reset requests. Wait a few minutes, then check your inbox "
                             "(and spam folder) for the mail we already sent.")
    await limiter.failed(db_sessions(request), email, address)  # every request counts against the limit
    async with db_session(request) as db:
        user = await auth.user_by_email(db, email)
        raw = await auth.new_reset_token(db, email) if user is not None else None
        await db.commit()
    if raw is not None:
        settings = ctx(request).settings
        link = f"{settings.web_url}/reset?{urlencode({'email': email, 'token': raw})}"
        text = (f"Someone (hopefully you) asked to reset the password of your Slopbox account.\n\n"
                f"Open this link to choose a new one:\n{link}\n\nIt works once and expires in 1 hour. "
                f"If you did not ask for this, ignore this mail: your password stays as it is.\n")
        task = asyncio.get_running_loop().create_task(mail(settings, email, "Reset your password", text))
        _pending.add(task)
        task.add_done_callback(_pending.discard)
    return render(request, "message.html", title="Check your email",
                  detail=f"If an account exists for {email}, we sent it a link to reset the password. "
                         "The link expires in 1 hour.")

@router.get("/reset", response_class=HTMLResponse)
async def reset_page(request: Request, email: str = "", token: str = "") -> Response:
    """The mailed link only shows the form: a mail scanner fetching it does not use the token up."""
    return render(request, "reset.html", email=email[:255], token=token[:255])

@router.post("/reset", response_class=HTMLResponse)
async def reset(request: Request) -> Response:
    fields = await form(request)
    email = auth.normalize_email(fields.get("email", ""))[:255]
    token, password = fields.get("token", "")[:255], fields.get("password", "")
    if problem := _password_problem(password):  # checked first: a typo must not use the link up
        return render(request, "reset.html", 400, email=email, token=token, error=problem)
    if password != fields.get("confirm", ""):
        return render(request, "reset.html", 400, email=email, token=token, error="The two passwords differ.")
    async with db_session(request) as db:
        user = await auth.user_by_email(db, email) if email else None
        ok = user is not None and user.id is not None and await auth.use_reset_token(db, email, token)
        if ok and user is not None and user.id is not None:
            user.password_hash = auth.hash_password(password)
            user.email_verified = user.email_verified or datetime.now(UTC)  # they read mail sent there
            await auth.delete_user_sessions(db, user.id)
        await db.commit()
    if not ok:
        return render(request, "message.html", 400, title="Link not valid", forgot_link=True,
                      detail="This password-reset link was already used, has expired or is wrong. "
                             "Ask for a new one.")
    await ctx(request).limiter.succeeded(db_sessions(request), email)
    return _signed_out(request, render(
        request, "message.html", title="Password changed", login_link=True,
        detail="Your new password is set and every session of your account has been signed out. "
               "Log in with the new password."))


# --- the account page ------------------------------------------------------------------------------

async def _account_page(request: Request, user: User, status: int = 200, **values: Any) -> HTMLResponse:
    assert user.id is not None
    async with db_session(request) as db:
        linked = await auth.linked_providers(db, user.id)
    labels = {"google": "Google", "github": "GitHub"}
    methods = (["Email and password"] if user.password_hash else []) + [labels.get(p, p) for p in linked]
    return render(request, "account.html", status, account=user, methods=methods, **values)

@router.get("/account", response_class=HTMLResponse)
async def account_page(request: Request) -> Response:
    user, _ = await require_user(request)
    return await _account_page(request, user)

@router.post("/account/password", response_class=HTMLResponse)
async def change_password(request: Request) -> Response:
    """Needs the current password (rate limited like log-in); signs out every other session."""
    user, _ = await require_user(request)
    fields = await form(request)
    assert user.id is not None and user.email is not None
    limiter, address = ctx(request).limiter, client_address(request)
    if await limiter.blocked(db_sessions(request), user.email, address):
        return render(request, "error.html", 429, title="Too many attempts",
                      detail="Too many wrong passwords. Wait a few minutes and try again.")
    if not user.password_hash:
        return await _account_page(request, user, 400, error="This account has no password yet: use "
                                                              "\"Forgot password?\" on the log-in page to set one.")
    if not auth.check_password(user.password_hash, fields.get("current", "")):
        await limiter.failed(db_sessions(request), user.email, address)
        return await _account_page(request, user, 401, error="That is not your current password.")
    password = fields.get("password", "")
    if problem := _password_problem(password):
        return await _account_page(request, user, 400, error=problem)
    if password != fields.get("confirm", ""):
        return await _account_page(request, user, 400, error="The two new passwords differ.")
    current = request.cookies.get(ctx(request).session_cookie)
    async with db_session(request) as db:
        row = await db.get(User, user.id)
        assert row is not None
        row.password_hash = auth.hash_password(password)
        ended = await auth.delete_user_sessions(db, user.id, keep=current)
        await db.commit()
        await db.refresh(row)
    await limiter.succeeded(db_sessions(request), user.email)
    return await _account_page(request, row, notice=f"Password changed. Signed out {ended} other "
                                                    f"session{'' if ended == 1 else 's'}.")

@router.post("/account/logout-everywhere")
async def logout_everywhere(request: Request) -> Response:
    user, _ = await require_user(request)
    await form(request)
    assert user.id is not None
    async with db_session(request) as db:
        await auth.delete_user_sessions(db, user.id)
        await db.commit()
    return _signed_out(request, RedirectResponse("/login", status_code=303))
