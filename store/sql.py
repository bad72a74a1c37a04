"""The SQL store: entity rows with optimistic concurrency, the outbox, and the append-only journal.

Every `apply()` is one transaction: the entity's new row (guarded by its version), its journal row, the effects it
emits, and the deletion of the outbox row it answers. Either all of it is there after a crash or none of it is.
"""

from __future__ import annotations

import builtins
import functools
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    BindParameter,
    Connection,
    Engine,
    Integer,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    InvalidatePoolError,
    NoSuchModuleError,
    OperationalError,
    StatementError,
)
from sqlalchemy.exc import (
    DatabaseError as SqlDatabaseError,
)
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.selectable import TextualSelect

from store import migrate
from store.errors import (
    DatabaseUnreachable,
    DatabaseUnusable,
    EffectGone,
    InvalidDatabaseUrl,
    SchemaMissing,
    StaleVersion,
)
from store.records import Entity, JournalEntry, NewEffect, PendingEffect, Transition
from store.schema import UtcDateTime, entities, journal, outbox
from store.world import WorldTables

SQLITE_BUSY_TIMEOUT_MS = 10_000  # a second writer waits this long for the lock before the store gives up
# A pooled PostgreSQL connection is pinged before use only if it sat idle this long. The ping is there for connections
# that went stale while parked (a server restart, a proxy's idle cut-off); pinging one used a millisecond ago cost a
# round trip on every call, two per transition: 11 to 18 % of a transition's time (bench/engine.py). 0.1 s is shorter
# than a server restart takes (pg_ctl restart: 0.2 s here), so a restart between two calls is still caught by the
# ping; a server that dies between ping and statement never was, and is reported as DatabaseUnreachable as before.
PING_AFTER_IDLE_SECONDS = 0.1

# The statements of the per-transition path, built once and run with bound parameters. Building one with literal
# values on every call cost more than running it (SQLAlchemy coerces each value into a bind, then walks them all to
# compute the key of its compiled-statement cache): about half of a SQLite commit, per bench/engine.py.
_GET_ENTITY = select(entities).where(entities.c.kind == bindparam("w_kind"), entities.c.key == bindparam("w_key"))
_INSERT_ENTITY = insert(entities)
# No .values(): the SET clause is made of the parameters named after columns; the w_ ones go to the WHERE clause.
_UPDATE_ENTITY = (
    update(entities)
    .where(entities.c.kind == bindparam("w_kind"), entities.c.key == bindparam("w_key"),
           entities.c.version == bindparam("w_version"))
    .returning(entities.c.created_at)
)
_INSERT_JOURNAL = insert(journal).inline()  # inline: its id is not wanted back, so no RETURNING on PostgreSQL
# All of a transition's effects in one call (executemany); sort_by_parameter_order: the ids come back in row order.
_INSERT_OUTBOX = insert(outbox).returning(outbox.c.id, sort_by_parameter_order=True)
_DELETE_OUTBOX = delete(outbox).where(outbox.c.id == bindparam("w_id"))


def sqlite_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'meshloom.db'}"


def redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _sqlite_pragmas(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
    # WAL lets readers (meshctl state) run beside the engine; synchronous=NORMAL in WAL mode keeps every commit
    # atomic and durable against a process crash, and loses at most the last commits on a power cut.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidDatabaseUrl(url) from None
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            engine = create_engine(parsed, connect_args=_pg_connect_args())
            _ping_when_idle(engine)
    except (NoSuchModuleError, ImportError):  # ImportError: a dialect SQLAlchemy knows but whose driver is absent
        raise InvalidDatabaseUrl(redact(url), "unsupported database (use sqlite:/// or postgresql://)") from None
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """`pool_pre_ping`, but only for connections idle for PING_AFTER_IDLE_SECONDS or more."""
    dialect = engine.dialect

    def checkin(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        if record is not None:
            record.info["meshloom_idle_since"] = time.monotonic()

    def checkout(dbapi_conn: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        idle_since = record.info.get("meshloom_idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return  # a fresh connection, or one just used
        try:
            dialect.do_ping(dbapi_conn)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_conn, None):
                # As pool_pre_ping does: the pool drops this and every older connection, then connects anew.
                raise InvalidatePoolError() from exc
            raise

    event.listen(engine, "checkin", checkin)
    event.listen(engine, "checkout", checkout)


@contextmanager
def translated(url: str) -> Iterator[None]:
    """SQLAlchemy's errors as the store's own, for callers that cannot import SQLAlchemy."""
    try:
        yield
    except OperationalError as exc:
        if _is_unreachable(exc):
            raise DatabaseUnreachable(redact(url), _first_line(exc)) from None
        raise
    except StatementError as exc:
        # A value refused before it reached the database (a naive datetime, a payload JSON cannot encode): the
        # caller's bug, raised as the caller's own ValueError/TypeError, not as a SQLAlchemy type it cannot import.
        if type(exc) is StatementError and isinstance(exc.orig, (ValueError, TypeError)):
            raise exc.orig from None
        if type(exc) is SqlDatabaseError and "not a database" in str(exc.orig):
            raise DatabaseUnusable(redact(url), _first_line(exc)) from None
        raise


def missing_sqlite_file(url: str) -> str | None:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidDatabaseUrl(url) from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return None if Path(parsed.database).exists() else parsed.database


def _pg_connect_args() -> dict[str, Any]:
    return {"connect_timeout": int(os.environ.get("MESHLOOM_DB_CONNECT_TIMEOUT", "5"))}


class Store(WorldTables):
    """The only door to SQL. Hands out records; takes `Transition`s."""

    def __init__(self, url: str, *, check_schema: bool = True) -> None:
        self.url = url
        if check_schema:
            missing = missing_sqlite_file(url)
            if missing is not None:
                raise SchemaMissing(missing)  # reading must not leave an empty database behind
        self.engine = make_engine(url)
        # Single statements run outside any explicit transaction on PostgreSQL (a statement is atomic by itself):
        # psycopg would otherwise send a BEGIN before it and a ROLLBACK or COMMIT after it, two more round trips
        # each. Reads use it, and so does a transition that answers no effect (see `apply`). pysqlite never opens a
        # transaction for a SELECT, so SQLite keeps the plain engine.
        self._autocommit = (self.engine if self.engine.dialect.name == "sqlite"
                            else self.engine.execution_options(isolation_level="AUTOCOMMIT"))
        # PostgreSQL runs a transition's writes as one statement (data-modifying WITH); SQLite has no such thing.
        self._postgresql = self.engine.dialect.name == "postgresql"
        if check_schema:
            with self._connect() as conn:
                migrate.require_head(conn, url)

    # ---- plumbing ------------------------------------------------------------------------------------------
    @contextmanager
    def _connect(self, *, autocommit: bool = False) -> Iterator[Connection]:
        with translated(self.url), (self._autocommit if autocommit else self.engine).connect() as conn:
            yield conn

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self._connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _single_statement(self) -> Iterator[Connection]:
        """For a write made of one statement: atomic by itself on PostgreSQL, so no BEGIN and COMMIT round trips."""
        if self._postgresql:
            with self._connect(autocommit=True) as conn:
                yield conn
        else:
            with self._transaction() as conn:
                yield conn

    def close(self) -> None:
        self.engine.dispose()

    # ---- entities ------------------------------------------------------------------------------------------
    def get(self, kind: str, key: str) -> Entity | None:
        with self._connect(autocommit=True) as conn:
            row = conn.execute(_GET_ENTITY, {"w_kind": kind, "w_key": key}).first()
        return _entity(row) if row is not None else None

    def list(self, kind: str | None = None, states: Sequence[str] | None = None,
             key_prefix: str | None = None) -> builtins.list[Entity]:
        query = select(entities).order_by(entities.c.kind, entities.c.key)
        if kind is not None:
            query = query.where(entities.c.kind == kind)
        if key_prefix:
            query = query.where(entities.c.key.startswith(key_prefix, autoescape=True))
        if states:
            query = query.where(entities.c.state.in_(list(states)))
        with self._connect(autocommit=True) as conn:
            return [_entity(r) for r in conn.execute(query)]

    def due_entities(self, now: datetime, limit: int = 1000) -> builtins.list[Entity]:
        query = select(entities).where(entities.c.due_at <= now).order_by(entities.c.due_at).limit(limit)
        with self._connect(autocommit=True) as conn:
            return [_entity(r) for r in conn.execute(query)]

    def next_due(self) -> datetime | None:
        """The earliest moment anything asked for: an entity's tick or an effect's (re)try."""
        with self._connect(autocommit=True) as conn:
            a = conn.execute(select(func.min(entities.c.due_at))).scalar()
            b = conn.execute(select(func.min(outbox.c.run_at))).scalar()
        times = [t for t in (a, b) if t is not None]
        return min(times) if times else None

    def counts(self) -> dict[str, dict[str, int]]:
        query = select(entities.c.kind, entities.c.state, func.count()).group_by(entities.c.kind, entities.c.state)
        out: dict[str, dict[str, int]] = {}
        with self._connect(autocommit=True) as conn:
            for kind, state, n in conn.execute(query):
                out.setdefault(kind, {})[state] = n
        return out

    # ---- the one write ---------------------------------------------------------------------------------------
    def apply(self, t: Transition) -> tuple[Entity, builtins.list[PendingEffect]]:
        """Commit a transition with its journal row and effects; raise StaleVersion if another writer won."""
        version = t.expected_version + 1
        try:
            if self._postgresql and not (t.consumes is not None and t.expected_version == 0):
                # One statement that writes all or nothing (see below), so it needs no transaction of its own.
                with self._single_statement() as conn:
                    created, pending = _write_in_one_statement(conn, t, version)
            else:
                with self._transaction() as conn:
                    created, pending = self._write(conn, t, version)
        except IntegrityError:
            # A concurrent writer created the entity (or journaled this version) first.
            raise StaleVersion(t.kind, t.key, t.expected_version) from None
        return _committed(t, version, created), pending

    def apply_all(self, transitions: Sequence[Transition]
                  ) -> builtins.list[tuple[Entity, builtins.list[PendingEffect]]]:
        """Commit many transitions in one transaction, all or none: StaleVersion (naming the first entity that lost a
        race) or EffectGone leave nothing written. One commit instead of one each: what a change reaching a thousand
        sidecars at once needs."""
        out: builtins.list[tuple[Entity, builtins.list[PendingEffect]]] = []
        current: Transition | None = None
        try:
            with self._transaction() as conn:
                for current in transitions:
                    version = current.expected_version + 1
                    created, pending = self._write(conn, current, version)
                    out.append((_committed(current, version, created), pending))
        except IntegrityError:
            # Raised by the write of `current` (or, should the database defer it, at commit: then the last one).
            assert current is not None
            raise StaleVersion(current.kind, current.key, current.expected_version) from None
        return out

    def get_many(self, kind: str, keys: Sequence[str]) -> dict[str, Entity]:
        found: dict[str, Entity] = {}
        with self._connect(autocommit=True) as conn:
            for i in range(0, len(keys), 500):
                query = select(entities).where(entities.c.kind == kind, entities.c.key.in_(list(keys[i:i + 500])))
                found.update((r.key, _entity(r)) for r in conn.execute(query))
        return found

    def _write(self, conn: Connection, t: Transition, version: int) -> tuple[datetime, builtins.list[PendingEffect]]:
        """The transition's writes, one statement each (SQLite; PostgreSQL uses `_write_in_one_statement`)."""
        if t.consumes is not None:
            gone = conn.execute(_DELETE_OUTBOX, {"w_id": t.consumes}).rowcount
            if gone != 1:
                raise EffectGone(t.consumes)
        row = {"state": t.to_state, "version": version, "retry_count": 0, "retry_at": None,
               "due_at": t.due_at, "data": dict(t.data), "updated_at": t.at}
        if t.expected_version == 0:
            conn.execute(_INSERT_ENTITY, {"kind": t.kind, "key": t.key, "created_at": t.at, **row})
            created = t.at
        else:
            found = conn.execute(_UPDATE_ENTITY, {"w_kind": t.kind, "w_key": t.key,
                                                  "w_version": t.expected_version, **row}).first()
            if found is None:
                raise StaleVersion(t.kind, t.key, t.expected_version)
            created = found[0]
        conn.execute(_INSERT_JOURNAL, {
            "kind": t.kind, "key": t.key, "version": version, "from_state": t.from_state,
            "to_state": t.to_state, "trigger": t.trigger, "reason": t.reason, "detail": t.detail,
            "actor": t.actor, "at": t.at})
        return created, self._insert_effects(conn, t.kind, t.key, t.effects, t.at)

    @staticmethod
    def _insert_effects(conn: Connection, kind: str, key: str, effects: Sequence[NewEffect],
                        at: datetime) -> builtins.list[PendingEffect]:
        if not effects:
            return []
        rows = [{"kind": kind, "key": key, "effect": e.effect, "payload": dict(e.payload), "attempts": 0,
                 "run_at": e.run_at, "created_at": at} for e in effects]
        ids = conn.execute(_INSERT_OUTBOX, rows).scalars().all()
        return [PendingEffect(i, kind, key, e.effect, e.payload, 0, e.run_at, None)
                for i, e in zip(ids, effects, strict=True)]

    # ---- the outbox ------------------------------------------------------------------------------------------
    def due_effects(self, now: datetime, limit: int = 1000, *, fresh_too: bool = False) -> builtins.list[PendingEffect]:
        """Effects whose time has come; `fresh_too` adds never-tried ones whatever their lease (crash recovery)."""
        cond = outbox.c.run_at <= now
        if fresh_too:
            cond = cond | (outbox.c.attempts == 0)
        query = select(outbox).where(cond).order_by(outbox.c.id).limit(limit)
        with self._connect(autocommit=True) as conn:
            return [_pending(r) for r in conn.execute(query)]

    def pending_effects(self, kind: str | None = None, key: str | None = None) -> builtins.list[PendingEffect]:
        query = select(outbox).order_by(outbox.c.id)
        if kind is not None:
            query = query.where(outbox.c.kind == kind)
        if key is not None:
            query = query.where(outbox.c.key == key)
        with self._connect(autocommit=True) as conn:
            return [_pending(r) for r in conn.execute(query)]

    def postpone_effect(self, effect_id: int, attempts: int, run_at: datetime, error: str) -> None:
        """Record a failed attempt: the effect waits until `run_at`, and its entity shows the retry."""
        with self._transaction() as conn:
            row = conn.execute(
                update(outbox).where(outbox.c.id == effect_id)
                .values(attempts=attempts, run_at=run_at, last_error=error)
                .returning(outbox.c.kind, outbox.c.key)
            ).first()
            if row is None:
                raise EffectGone(effect_id)
            conn.execute(update(entities).where(entities.c.kind == row[0], entities.c.key == row[1])
                         .values(retry_count=attempts, retry_at=run_at))

    def drop_effect(self, effect_id: int) -> bool:
        """Remove a finished effect that feeds nothing back. False if it was already gone."""
        with self._single_statement() as conn:
            return bool(conn.execute(_DELETE_OUTBOX, {"w_id": effect_id}).rowcount)

    # ---- the journal -----------------------------------------------------------------------------------------
    def journal(self, kind: str, key: str) -> builtins.list[JournalEntry]:
        query = (select(journal).where(journal.c.kind == kind, journal.c.key == key)
                 .order_by(journal.c.version))
        with self._connect(autocommit=True) as conn:
            return [_journal(r) for r in conn.execute(query)]

    def journal_all(self, after_id: int = 0, limit: int = 10_000) -> builtins.list[JournalEntry]:
        query = select(journal).where(journal.c.id > after_id).order_by(journal.c.id).limit(limit)
        with self._connect(autocommit=True) as conn:
            return [_journal(r) for r in conn.execute(query)]



# ---- PostgreSQL: a transition's writes in one statement ---------------------------------------------------------
# The same writes as `Store._write`, sent as one statement: the row (guarded by its version), its journal row, its
# effects and the deletion of the effect it answers. Each statement is a round trip to the server: a transition took
# six or seven (the `get` before it, BEGIN, three or four writes, COMMIT), and takes four in a transaction, two without
# one. In bench/engine.py's `update` workload: 912 transitions/s before, 1,165 in a transaction, 1,341 without.
# Every sub-statement runs to completion whatever the final SELECT reads. The journal and effect rows are taken FROM
# e, so a stale version writes none of them: the statement then wrote nothing at all, which is why `apply` sends it
# alone, without a transaction. Answering an effect keeps that all-or-nothing: x locks the answered outbox row, the
# row is updated only if x found it, and the outbox row is deleted only if the row was updated. A second engine
# answering the same effect waits on that lock and then finds the row gone (x empty: EffectGone, nothing written);
# a stale version finds x but updates nothing, so the effect stays for the retry. A duplicate entity or journal
# version raises IntegrityError, as in `_write`.
_PG_CREATE = """e AS (
    INSERT INTO entities (kind, key, state, version, retry_count, retry_at, due_at, data, created_at, updated_at)
    VALUES (:kind, :key, :state, :version, 0, NULL, :due_at, CAST(:data AS JSON), :at, :at)
    RETURNING created_at)"""
_PG_UPDATE = """e AS (
    UPDATE entities SET state = :state, version = :version, retry_count = 0, retry_at = NULL, due_at = :due_at,
                        data = CAST(:data AS JSON), updated_at = :at
    WHERE kind = :kind AND key = :key AND version = :expected
    RETURNING created_at)"""
_PG_JOURNAL = """j AS (
    INSERT INTO journal (kind, key, version, from_state, to_state, trigger, reason, detail, actor, at)
    SELECT :kind, :key, :version, :from_state, :state, :trigger, :reason, :detail, :actor, :at FROM e)"""
_PG_LOCK_ANSWERED = """x AS (SELECT id FROM outbox WHERE id = :consumes FOR UPDATE)"""
_PG_CONSUME = """c AS (DELETE FROM outbox WHERE id IN (SELECT id FROM x) AND EXISTS (SELECT 1 FROM e) RETURNING id)"""
# The ids come from a sequence in the order of ORDER BY v.n, so sorted ids are in the order of the effects.
_PG_EFFECTS = """o AS (
    INSERT INTO outbox (kind, key, effect, payload, attempts, run_at, created_at)
    SELECT :kind, :key, v.effect, v.payload, 0, v.run_at, :at
    FROM e, (VALUES {rows}) AS v (n, effect, payload, run_at)
    ORDER BY v.n
    RETURNING id)"""
_PG_EFFECT_ROW = "({n}, CAST(:effect_{n} AS VARCHAR), CAST(:payload_{n} AS JSON), CAST(:run_at_{n} AS TIMESTAMP))"


@functools.lru_cache(maxsize=64)
def _one_statement(create: bool, consumes: bool, effects: int) -> TextualSelect:
    assert not (create and consumes), "an outcome always answers an entity that exists"
    if consumes:
        update = _PG_UPDATE.replace("AND version = :expected", "AND version = :expected AND EXISTS (SELECT 1 FROM x)")
        ctes = [_PG_LOCK_ANSWERED, update, _PG_JOURNAL, _PG_CONSUME]
    else:
        ctes = [_PG_CREATE if create else _PG_UPDATE, _PG_JOURNAL]
    binds: builtins.list[BindParameter[Any]] = [
        bindparam("at", type_=UtcDateTime()), bindparam("due_at", type_=UtcDateTime()), bindparam("data", type_=JSON())]
    if effects:
        ctes.append(_PG_EFFECTS.format(rows=", ".join(_PG_EFFECT_ROW.format(n=n) for n in range(effects))))
        for n in range(effects):
            binds += [bindparam(f"payload_{n}", type_=JSON()), bindparam(f"run_at_{n}", type_=UtcDateTime())]
    sql = (f"WITH {', '.join(ctes)}\n"
           f"SELECT (SELECT created_at FROM e) AS created_at, "
           f"{'(SELECT count(*) FROM x)' if consumes else 'NULL'} AS answerable, "
           f"{'ARRAY(SELECT id FROM o)' if effects else 'NULL'} AS ids")
    return text(sql).bindparams(*binds).columns(created_at=UtcDateTime(), answerable=Integer(), ids=ARRAY(BigInteger()))


def _committed(t: Transition, version: int, created: datetime) -> Entity:
    """The entity as `t` left it, once committed: what `apply` and `apply_all` hand back."""
    return Entity(t.kind, t.key, t.to_state, version, 0, None, t.due_at, dict(t.data), created, t.at)


def _write_in_one_statement(conn: Connection, t: Transition,
                            version: int) -> tuple[datetime, builtins.list[PendingEffect]]:
    params: dict[str, Any] = {
        "kind": t.kind, "key": t.key, "state": t.to_state, "version": version, "expected": t.expected_version,
        "due_at": t.due_at, "data": dict(t.data), "at": t.at, "from_state": t.from_state, "trigger": t.trigger,
        "reason": t.reason, "detail": t.detail, "actor": t.actor, "consumes": t.consumes,
    }
    for n, e in enumerate(t.effects):
        params |= {f"effect_{n}": e.effect, f"payload_{n}": dict(e.payload), f"run_at_{n}": e.run_at}
    statement = _one_statement(t.expected_version == 0, t.consumes is not None, len(t.effects))
    created, answerable, ids = conn.execute(statement, params).one()
    if t.consumes is not None and answerable != 1:
        raise EffectGone(t.consumes)
    if created is None:
        raise StaleVersion(t.kind, t.key, t.expected_version)
    pending = [PendingEffect(i, t.kind, t.key, e.effect, e.payload, 0, e.run_at, None)
               for i, e in zip(sorted(ids or ()), t.effects, strict=True)]
    return created, pending


def _entity(r: Any) -> Entity:
    return Entity(r.kind, r.key, r.state, r.version, r.retry_count, r.retry_at, r.due_at, r.data, r.created_at,
                  r.updated_at)


def _pending(r: Any) -> PendingEffect:
    return PendingEffect(r.id, r.kind, r.key, r.effect, r.payload, r.attempts, r.run_at, r.last_error)


def _journal(r: Any) -> JournalEntry:
    return JournalEntry(r.id, r.kind, r.key, r.version, r.from_state, r.to_state, r.trigger, r.reason, r.detail,
                        r.actor, r.at)


def _is_unreachable(exc: OperationalError) -> bool:
    msg = str(exc.orig).lower()
    return any(s in msg for s in ("connection", "could not connect", "unable to open", "timeout expired",
                                  "name or service", "no such host", "password authentication", "does not exist"))


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
