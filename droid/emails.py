"""E-mail addresses: the one spelling Droid registers and signs in with, and the skeleton that
tells a look-alike of a registered address.

`normalise(text)` gives three forms of an address:

- `display`: what the account shows (`/auth/me`, tokens): NFKC (a fullwidth `ｂ` is `b`, a
  ligature `ﬁ` is `fi`), lower case (a Turkish `İ`, which lower-cases to `i` and a combining dot,
  is `i`), the domain in Unicode as IDNA (UTS #46) maps it.
- `key`: what an account is found by, unique: `display` with the domain in ASCII (IDNA), so that
  `bücher.example` and `xn--bcher-kva.example` are one domain.
- `skeleton`: UTS #39's skeleton of `display` (NFD, each character replaced by its prototype,
  NFD again) over the ASCII look-alikes of droid/confusables.py, unique too: a Cyrillic `а`
  (U+0430) has the skeleton of a Latin `a`, so `аda@example.com` cannot be registered beside
  `ada@example.com`. Look-alikes of non-ASCII letters between other scripts are not covered.

Accounts stored before this spelling (an e-mail as email-validator normalised it, lower-cased)
get their key and skeleton when the store opens; two old accounts that now share one (the same
address in fullwidth and in ASCII, say) keep theirs: the later gets `legacy:<id>`, never a form
of an address, and is still found by the e-mail it was stored with (LoginHandler).
"""
from __future__ import annotations

import dataclasses
import unicodedata

import idna

from .confusables import prototypes

LEGACY = "legacy:"
_PROTOTYPES = prototypes()


@dataclasses.dataclass(frozen=True)
class Address:
    display: str
    key: str
    skeleton: str


def normalise(text: str) -> Address:
    """The forms of an address; ValueError when it has no `local@domain` shape."""
    address = unicodedata.normalize("NFKC", text.strip()).lower().replace("i\u0307", "i")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError("not an e-mail address")
    try:
        ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
        unicode_domain = idna.decode(ascii_domain)
    except (idna.IDNAError, UnicodeError):
        # Not a name IDNA takes (registration has refused it already): as it is.
        ascii_domain = unicode_domain = domain
    display = f"{local}@{unicode_domain}"
    return Address(display=display, key=f"{local}@{ascii_domain}", skeleton=skeleton(display))


def skeleton(text: str) -> str:
    """UTS #39's skeleton over droid/confusables.py's table."""
    mapped = "".join(_PROTOTYPES.get(c, c) for c in unicodedata.normalize("NFD", text))
    return unicodedata.normalize("NFD", mapped)


def stored_forms(user_id: str, email: str) -> list[tuple[str, str]]:
    """For an account stored before normalisation: the (key, skeleton) pairs to try in order, its
    own first, then `legacy:<id>` for the skeleton, then for both (when another account holds
    them already)."""
    legacy = LEGACY + user_id
    try:
        address = normalise(email)
    except ValueError:
        return [(legacy, legacy)]
    return [(address.key, address.skeleton), (address.key, legacy), (legacy, legacy)]


def with_forms(user: dict) -> dict:
    """A user document with its `emailKey` and `emailSkeleton` (computed from its `email` when it
    has none), so that every stored account has both: a copy, the caller's is left as it is."""
    if "emailKey" in user and "emailSkeleton" in user:
        return dict(user)
    try:
        address = normalise(user["email"])
        key, skel = address.key, address.skeleton
    except ValueError:
        key = skel = LEGACY + user["_id"]
    return {**user, "emailKey": key, "emailSkeleton": skel}
