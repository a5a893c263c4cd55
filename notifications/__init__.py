"""Notifications to users and admins: stored rows (the API shows them) and their email outbox."""

from notifications.store import alert_admins, notify_user

__all__ = ["alert_admins", "notify_user"]
