"""Web app accounts: one random access token per user, stored only as its SHA-256 hash, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError

USER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
TOKEN_BYTES = 32
"""256 random bits: a plain SHA-256 of such a token needs no salt or slow hash to resist guessing."""


@dataclass(frozen=True)
class User:
    """A person allowed to use the web app, as recorded with every case they classify or review."""

    name: str
    token_sha256: str


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as the users file stores it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_user_name(name: str) -> str:
    """`name` when it is a valid user name (letters, digits, . _ @ -; up to 64 characters)."""
    if not USER_NAME_PATTERN.match(name):
        raise ConfigError(
            f"user name {name!r} is not allowed; use 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
        )
    return name


class UserList:
    """The users file (JSON, written by `skin-fl-web add-user`): names and token hashes, never tokens."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.users: list[User] = self._read()

    def _read(self) -> list[User]:
        if not self.path.exists():
            return []
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))["users"]
            users = [User(name=check_user_name(str(entry["name"])), token_sha256=str(entry["token_sha256"])) for entry in entries]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(
                f"the users file {self.path} is unreadable or damaged ({error}); restore it from backup or "
                "delete it and add the users again with skin-fl-web add-user"
            ) from error
        for user in users:
            if not re.fullmatch(r"[0-9a-f]{64}", user.token_sha256):
                raise ConfigError(f"user {user.name!r} in {self.path} has no valid token hash; add the user again with skin-fl-web add-user --replace")
        return users

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        payload = {"users": [{"name": user.name, "token_sha256": user.token_sha256} for user in self.users]}
        # Only the service account should read who may log in; the file holds hashes, not tokens.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        os.replace(temporary, self.path)

    def add(self, name: str, *, replace: bool = False) -> str:
        """Create (or with `replace`, renew) a user's token; returns the token, which is shown once and not stored."""
        check_user_name(name)
        if any(user.name == name for user in self.users) and not replace:
            raise ConfigError(f"user {name!r} already exists in {self.path}; pass --replace to issue a new token (the old one stops working)")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        self.users = [user for user in self.users if user.name != name] + [User(name=name, token_sha256=hash_token(token))]
        self._write()
        return token

    def remove(self, name: str) -> None:
        """Delete a user; their token stops working at the web app's next request."""
        if not any(user.name == name for user in self.users):
            raise ConfigError(f"no user {name!r} in {self.path}; list the users with skin-fl-web list-users")
        self.users = [user for user in self.users if user.name != name]
        self._write()

    def names(self) -> list[str]:
        """User names in the order they were added."""
        return [user.name for user in self.users]


def authenticate(users: list[User], token: str) -> User | None:
    """The user whose token this is, or None; every hash is compared, in constant time, so timing reveals nothing."""
    presented = hash_token(token)
    found = None
    for user in users:
        if hmac.compare_digest(presented, user.token_sha256):
            found = user
    return found


class UserDirectory:
    """The users file, re-read when it changes so that IT's additions and removals apply at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._users: list[User] = []

    def users(self) -> list[User]:
        """The current users."""
        try:
            status = os.stat(self.path)
            stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or stamp is None:
                self._users = UserList(self.path).users
                self._stamp = stamp
            return self._users
