"""Problems, and the reader that turns a plain manifest (dicts and lists from YAML or JSON) into checked values.

A `Reader` reads one resource. Every accessor records what is wrong with the field it was asked for -- missing,
wrong type, out of range -- and returns a harmless default, so that parsing carries on and one pass reports every
problem of a manifest, not only the first. A field whose parent is missing or malformed is not reported again:
`spec: is required` says it all, without a line for each field under `spec`.

`null` and the empty string count as absent, as in Kubernetes: `weight:` with nothing after it is a missing weight,
`clusterIP: ""` an address not allocated yet.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

E = TypeVar("E", bound=StrEnum)


# ------------------------------------------------------------------------------------------------- problems ---
@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with one field of one resource; `str()` is the line a user reads."""

    resource: str  # "TrafficSplit default/web-split", "MeshConfig mesh", "document 3"
    field: str  # "spec.backends[1].weight"; "" when the problem is the whole resource
    message: str

    def __str__(self) -> str:
        if self.field:
            return f"{self.resource}: {self.field}: {self.message}"
        return f"{self.resource}: {self.message}"


class ValidationError(Exception):
    """Manifests that cannot be accepted; `problems` lists every reason, each naming its resource and field."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# ------------------------------------------------------------------------------------------------ immutables ---
class FrozenMap(Mapping[str, str]):
    """An immutable, hashable string-to-string mapping (labels, selectors, annotations, header filters).

    Items are kept sorted by key, so two maps with the same items iterate (and serialize) the same way.
    """

    __slots__ = ("_items", "_hash")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, str] = dict(sorted(dict(items).items()))
        self._hash = hash(tuple(self._items.items()))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._hash == other._hash and self._items == other._items
        if isinstance(other, Mapping):
            return self._items == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"

    def to_dict(self) -> dict[str, str]:
        return dict(self._items)

    def show(self) -> str:
        """`a=1,b=2`, as kubectl prints labels."""
        return ",".join(f"{k}={v}" for k, v in self._items.items())


EMPTY = FrozenMap()


# ------------------------------------------------------------------------------------------------ validators ---
# A validator returns None when the value is fine, else the message saying what it must be.
Check = Callable[[str], "str | None"]

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")


def dns_label(value: str) -> str | None:
    """Namespaces, Services, port names: RFC 1123 labels, as Kubernetes requires."""
    if len(value) <= 63 and _LABEL.match(value):
        return None
    return (f"must be a DNS-1123 label (at most 63 lowercase letters, digits and '-', starting and ending with a "
            f"letter or digit), got {value!r}")


def dns_subdomain(value: str) -> str | None:
    """Names of Pods and policies: RFC 1123 subdomains (labels joined by dots)."""
    if len(value) <= 253 and _SUBDOMAIN.match(value):
        return None
    return (f"must be a DNS-1123 subdomain (at most 253 lowercase letters, digits, '-' and '.', starting and ending "
            f"with a letter or digit), got {value!r}")


def ip_address(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"must be an IPv4 or IPv6 address, got {value!r}"
    return None


def regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"must be a valid regular expression, got {value!r} ({exc})"
    return None


def describe(value: object) -> str:
    """How a wrong value is shown in a message: the value itself when short, else its type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else f"a string of {len(value)} characters"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f'{path}["{key}"]'
    return f"{path}.{key}" if path else key


# ---------------------------------------------------------------------------------------------------- reader ---
_ABSENT: Any = object()


class Reader:
    """Reads the fields of one manifest, collecting problems under one resource label."""

    def __init__(self, resource: str) -> None:
        self.resource = resource
        self.problems: list[Problem] = []

    def add(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.resource, field, message))

    def _get(self, m: Mapping[str, Any] | None, key: str) -> Any:
        if m is None:
            return _ABSENT
        value = m.get(key)
        return _ABSENT if value is None or value == "" else value

    def _missing(self, m: Mapping[str, Any] | None, path: str, required: bool) -> None:
        # Only when the parent is there: a missing parent has been reported already.
        if required and m is not None:
            self.add(path, "is required")

    def mapping(self, m: Mapping[str, Any] | None, key: str, path: str, *,
                required: bool = False) -> Mapping[str, Any] | None:
        value, where = self._get(m, key), join(path, key)
        if value is _ABSENT:
            self._missing(m, where, required)
            return None
        return self.as_mapping(value, where)

    def as_mapping(self, value: object, where: str) -> Mapping[str, Any] | None:
        if not isinstance(value, Mapping):
            self.add(where, f"must be a mapping, got {describe(value)}")
            return None
        return value

    def elements(self, m: Mapping[str, Any] | None, key: str, path: str, *, required: bool = False,
                 nonempty: bool = False) -> list[tuple[str, Any]]:
        """The items of a list field, each with its path (`spec.backends[0]`)."""
        value, where = self._get(m, key), join(path, key)
        if value is _ABSENT:
            self._missing(m, where, required or nonempty)
            return []
        if not isinstance(value, list | tuple):
            self.add(where, f"must be a list, got {describe(value)}")
            return []
        if nonempty and not value:
            self.add(where, "must list at least one item")
        return [(join(where, i), item) for i, item in enumerate(value)]

    def string(self, m: Mapping[str, Any] | None, key: str, path: str, *, required: bool = True,
               default: str = "", check: Check | None = None) -> str:
        value, where = self._get(m, key), join(path, key)
        if value is _ABSENT:
            self._missing(m, where, required)
            return default
        return self.as_string(value, where, check)

    def as_string(self, value: object, where: str, check: Check | None = None) -> str:
        if not isinstance(value, str):
            self.add(where, f"must be a string, got {describe(value)}")
            return ""
        if value == "":
            self.add(where, "must not be empty")
            return ""
        if check is not None and (message := check(value)) is not None:
            self.add(where, message)
        return value

    def integer(self, m: Mapping[str, Any] | None, key: str, path: str, *, required: bool = True,
                default: int = 0, low: int | None = None, high: int | None = None) -> int:
        value, where = self._get(m, key), join(path, key)
        if value is _ABSENT:
            self._missing(m, where, required)
            return default
        return self.as_integer(value, where, low=low, high=high, default=default)

    def as_integer(self, value: object, where: str, *, low: int | None = None, high: int | None = None,
                   default: int = 0) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and \
                (low is None or value >= low) and (high is None or value <= high):
            return value
        if low is not None and high is not None:
            want = f"a whole number from {low} to {high}"
        elif low is not None:
            want = f"a whole number >= {low}"
        elif high is not None:
            want = f"a whole number <= {high}"
        else:
            want = "a whole number"
        self.add(where, f"must be {want}, got {describe(value)}")
        return default

    def port(self, m: Mapping[str, Any] | None, key: str, path: str, *, required: bool = True) -> int:
        return self.integer(m, key, path, required=required, low=1, high=65535)

    def boolean(self, m: Mapping[str, Any] | None, key: str, path: str, *, default: bool = False) -> bool:
        value, where = self._get(m, key), join(path, key)
        if value is _ABSENT:
            return default
        if not isinstance(value, bool):
            self.add(where, f"must be true or false, got {describe(value)}")
            return default
        return value

    def string_map(self, m: Mapping[str, Any] | None, key: str, path: str) -> FrozenMap:
        section = self.mapping(m, key, path)
        if not section:
            return EMPTY
        where, out = join(path, key), {}
        for k, v in section.items():
            if not isinstance(k, str) or not k:
                self.add(where, f"keys must be non-empty strings, got {describe(k)}")
            elif not isinstance(v, str):
                self.add(join(where, k), f"must be a string, got {describe(v)} (quote it in YAML)")
            else:
                out[k] = v
        return FrozenMap(out)

    def choice(self, m: Mapping[str, Any] | None, key: str, path: str, enum: type[E], default: E) -> E:
        value, where = self._get(m, key), join(path, key)
        if value is _ABSENT:
            return default
        try:
            return enum(value)
        except ValueError:
            self.add(where, f"must be one of {', '.join(e.value for e in enum)}, got {describe(value)}")
            return default

    def only(self, m: Mapping[str, Any] | None, path: str, allowed: Collection[str]) -> None:
        """Reject fields that the resource does not have: in a policy, a typo (`weigth`) must not pass silently."""
        if m is None:
            return
        for key in m:
            if key not in allowed:
                self.add(join(path, str(key)), f"unknown field (known here: {', '.join(sorted(allowed))})")
