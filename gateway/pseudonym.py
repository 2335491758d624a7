"""Patient pseudonyms: keyed HMACs of the hospital's own patient identifier.

A patient's ref is ``"p-"`` followed by the first 12 hex digits (48 bits) of
HMAC-SHA256(pseudonym key, normalised identifier). The same identifier (an MRN, a
home-care case number) gives the same ref on every run and after every restart,
so re-admitting a patient finds their roster entry again; without the key nobody
can go from an identifier to a ref or back, and refs from two gateways with
different keys cannot be linked.

48 bits keep a ref short enough to read out over a phone; the chance that two of a
ward's few thousand patients collide is below 1e-7, and `gateway.vault` refuses a
new patient whose ref is already taken rather than merging the two.

Normalisation: Unicode NFKC, surrounding and inner whitespace removed, letters in
upper case; so " mrn 00123" and "MRN00123" name the same patient. Leading zeros
are kept: they are significant in many hospitals' numbering.

Audit entries about a patient do not carry the ref itself (`audit_subject`): after
`patient forget` the ref must not appear in any file, and an audit trail cannot be
edited. They carry a second HMAC under the same key, with a different domain.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata

REF_PATTERN = re.compile(r"p-[0-9a-f]{12}")
_WHITESPACE = re.compile(r"\s+")


def normalise(identifier: str) -> str:
    r"""The identifier as it is hashed.

    Raises:
        ValueError: Nothing is left once whitespace is removed.

    >>> normalise(" mrn 00123 ")
    'MRN00123'
    >>> normalise("\uff2d\uff32\uff2e\u00a000123")  # full-width letters, no-break space
    'MRN00123'
    """
    text = _WHITESPACE.sub("", unicodedata.normalize("NFKC", identifier)).upper()
    if not text:
        raise ValueError("an empty patient identifier")
    return text


def pseudonym(key: bytes, identifier: str) -> str:
    """The patient ref for a local identifier under the gateway's pseudonym key.

    Raises:
        ValueError: The identifier is empty.

    >>> pseudonym(bytes(32), "MRN00123") == pseudonym(bytes(32), " mrn 00123")
    True
    >>> len(pseudonym(bytes(32), "MRN00123"))
    14
    """
    digest = hmac.new(key, normalise(identifier).encode(), hashlib.sha256)
    return "p-" + digest.hexdigest()[:12]


def audit_subject(key: bytes, ref: str) -> str:
    """What the audit trail records for a patient instead of their ref.

    A keyed hash with its own domain: it cannot be recomputed without the key, and
    no prefix of it is the ref.

    >>> audit_subject(bytes(32), "p-0123456789ab").startswith("s-")
    True
    """
    digest = hmac.new(key, b"audit-subject\0" + ref.encode(), hashlib.sha256)
    return "s-" + digest.hexdigest()[:16]
