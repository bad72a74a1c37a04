"""NATS naming shared by the control plane's publisher and the sidecar's client: pure string functions.

Both sides must agree on every name, and `actions` and `sidecar` may not import each other, so the names live here.

A sidecar key is "<namespace>/<pod-name>", and a pod name may contain dots. NATS splits subjects on '.', and a KV
key is limited to `[-/_=.a-zA-Z0-9]`, so a key becomes ONE token by escaping: ASCII letters, digits and '-' stay,
every other byte of its UTF-8 form (the '_' escape character itself included) becomes `_XX` (upper-case hex).
The mapping is injective and reversible (`sidecar_from_token`), and its tokens are valid NATS tokens and KV keys:

    "default/web-7d9.abc"  ->  "default_2Fweb-7d9_2Eabc"

Subjects (bucket `meshloom-config`, its stream `KV_meshloom-config`):

    config    $KV.meshloom-config.<token>                                          one KV key per sidecar
    get       $JS.API.DIRECT.GET.KV_meshloom-config.$KV.meshloom-config.<token>    direct get of the last value
    ack       meshloom.ack.<token>                                                 published by the sidecar
    inbox     _INBOX.<token of the SPIFFE ID>.>                                    replies to one identity
    shard     $KV.meshloom-config.shard.<ns>                                       one KV key per namespace
    get       $JS.API.DIRECT.GET.KV_meshloom-config.$KV.meshloom-config.shard.<ns> direct get of a shard

The outbound shards (one per namespace, see `catalog.documents`) live in the same bucket under the key
`shard.<ns>`, <ns> being the token of the namespace. A sidecar key is one token, a shard key two, so the two can
never collide, and the wildcards `$KV.meshloom-config.shard.>` (subscribe) and `SHARD_DIRECT_GET_WILDCARD`
(publish) cover every shard and no sidecar's document: shards hold no secrets, so every sidecar identity is allowed
them all. A wildcard inside a direct-get subject is served as the last message of any matching key, a shard here;
a request body naming another key (or a sequence) is refused by the server when the subject names the key.
"""

from __future__ import annotations

BUCKET = "meshloom-config"
STREAM = f"KV_{BUCKET}"
ACK_PREFIX = "meshloom.ack"
ACK_WILDCARD = f"{ACK_PREFIX}.>"
INBOX_ROOT = "_INBOX"
SHARD_ROOT = "shard"  # the first token of every shard key
SHARD_WILDCARD = f"$KV.{BUCKET}.{SHARD_ROOT}.>"
SHARD_DIRECT_GET_WILDCARD = f"$JS.API.DIRECT.GET.{STREAM}.{SHARD_WILDCARD}"

_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_HEX = frozenset("0123456789ABCDEF")


class BadToken(ValueError):
    """A string that no sidecar key maps to."""


def subject_token(sidecar: str) -> str:
    """The single NATS token (and KV key) that stands for a sidecar key; injective, see the module header."""
    if not sidecar:
        raise ValueError("a sidecar key cannot be empty")
    return "".join(chr(b) if b in _PLAIN else f"_{b:02X}" for b in sidecar.encode())


def sidecar_from_token(token: str) -> str:
    """The inverse of `subject_token`; raises `BadToken` for a string it never returns."""
    out = bytearray()
    i = 0
    while i < len(token):
        c = token[i]
        if c == "_":
            pair = token[i + 1:i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise BadToken(f"bad escape in {token!r}")
            out.append(int(pair, 16))
            i += 3
        elif c.isascii() and ord(c) in _PLAIN:
            out.append(ord(c))
            i += 1
        else:
            raise BadToken(f"unescaped {c!r} in {token!r}")
    try:
        sidecar = out.decode()
    except UnicodeDecodeError as exc:
        raise BadToken(f"{token!r} is not UTF-8 once unescaped") from exc
    if not sidecar or subject_token(sidecar) != token:  # e.g. "_61" for "a": one key, one token
        raise BadToken(f"{token!r} is not the canonical token of a sidecar key")
    return sidecar


def config_subject(sidecar: str) -> str:
    return f"$KV.{BUCKET}.{subject_token(sidecar)}"


def direct_get_subject(sidecar: str) -> str:
    """The direct-get request for the last value of one key: no payload, the subject names the key."""
    return f"$JS.API.DIRECT.GET.{STREAM}.{config_subject(sidecar)}"


def ack_subject(sidecar: str) -> str:
    return f"{ACK_PREFIX}.{subject_token(sidecar)}"


def sidecar_from_ack_subject(subject: str) -> str:
    prefix = f"{ACK_PREFIX}."
    if not subject.startswith(prefix):
        raise BadToken(f"{subject!r} is not an ack subject")
    return sidecar_from_token(subject[len(prefix):])


def inbox_prefix(spiffe_id: str) -> str:
    """The inbox prefix a client of this identity connects with; its permissions allow `<prefix>.>`.

    Per identity, not per connection: several pods may share a service account, hence a SPIFFE ID and a NATS user.
    """
    return f"{INBOX_ROOT}.{subject_token(spiffe_id)}"


def shard_key(namespace: str) -> str:
    """The KV key of a namespace's outbound shard: two tokens, so never a sidecar's key (always one token)."""
    return f"{SHARD_ROOT}.{subject_token(namespace)}"


def shard_subject(namespace: str) -> str:
    return f"$KV.{BUCKET}.{shard_key(namespace)}"


def shard_direct_get_subject(namespace: str) -> str:
    """The direct-get request for the last value of a namespace's shard: no payload, the subject names the key."""
    return f"$JS.API.DIRECT.GET.{STREAM}.{shard_subject(namespace)}"


def namespace_from_shard_subject(subject: str) -> str:
    """The inverse of `shard_subject`; raises `BadToken` for any other subject."""
    prefix = f"$KV.{BUCKET}.{SHARD_ROOT}."
    if not subject.startswith(prefix):
        raise BadToken(f"{subject!r} is not a shard subject")
    return sidecar_from_token(subject[len(prefix):])
