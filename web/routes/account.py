"""Email + password accounts: sign-up, verification by mailed link, login with a rate limit, logout."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from db.models import User
from web import auth
from web.pages import MIN_PASSWORD, client_address, ctx, db_session, form, mail, render

router = APIRouter()


@router.get("/signup", response_class=HTMLResponse)
async def signup_page(request: Request) -> Response:
    return render(request, "signup.html")

@router.post("/signup", response_class=HTMLResponse)
async def signup(request: Request) -> Response:
    settings = ctx(request).settings
    fields = await form(request)
    email = auth.normalize_email(fields.get("email", ""))
    password = fields.get("password", "")
    name = fields.get("name", "").strip()[:255] or None
    if "@" not in email or len(email) > 255 or any(c.isspace() for c in email):
        return render(request, "signup.html", 400, error="Enter a valid email address.", email=email, name=name)
    if len(password) < MIN_PASSWORD or len(password) > 1024:
        return render(request, "signup.html", 400, error=f"Use a password of at least {MIN_PASSWORD} characters.",
                      email=email, name=name)
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
    if ctx(request).limiter.blocked(email, address):
        return render(request, "error.html", 429, title="Too many attempts",
                      detail="Too many failed attempts. Wait a few minutes and try again.")
    async with db_session(request) as db:
        # The password chosen at sign-up is asked again: someone who signed up with another
        # person's address cannot have that person verify an account whose password they know.
        account = await auth.user_by_email(db, email) if email else None
        if not auth.check_password(account.password_hash if account else None, fields.get("password", "")):
            ctx(request).limiter.failed(email, address)
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
    return render(request, "login.html")

@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    fields = await form(request)
    email = auth.normalize_email(fields.get("email", ""))[:255]
    address = client_address(request)
    if ctx(request).limiter.blocked(email, address):
        return render(request, "error.html", 429, title="Too many attempts",
                      detail="Too many failed logins. Wait a few minutes and try again.")
    async with db_session(request) as db:
        user = await auth.user_by_email(db, email) if email else None
        ok = auth.check_password(user.password_hash if user else None, fields.get("password", ""))
        if not ok or user is None or user.id is None:
            ctx(request).limiter.failed(email, address)
            return render(request, "login.html", 401, error="Wrong email or password.", email=email)
        if user.email_verified is None:
            return render(request, "login.html", 403, email=email,
                          error="Verify your email first: open the link we sent you "
                                "(sign up again to get a new one).")
        ctx(request).limiter.succeeded(email)
        token, expires = await auth.create_session(db, user.id)
        await db.commit()
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(ctx(request).session_cookie, token, expires=expires, httponly=True, samesite="lax",
                        secure=ctx(request).secure, path="/")
    return response

@router.post("/logout")
async def logout(request: Request) -> Response:
    await form(request)
    token = request.cookies.get(ctx(request).session_cookie)
    if token:
        async with db_session(request) as db:
            await auth.delete_session(db, token)
            await db.commit()
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(ctx(request).session_cookie, path="/", secure=ctx(request).secure, httponly=True,
                           samesite="lax")
    return response
