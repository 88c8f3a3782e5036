"""A probabilistic finite-state grammar held as YAML data: compile, sample, score exactly.

The data (one YAML file, or every ``*.yaml`` in a directory, merged) has these sections:

``name``, ``version``, ``start``
    Identity (recorded with corpora) and the top rule.
``rules``
    rule -> weighted alternatives, each a template of literal text and placeholders. Either a
    block string, one template per line (stripped; ``#`` lines are comments), or a list whose
    items are template strings (used verbatim, so ``" {x}"`` and ``""`` work) or
    ``{text, weight}`` mappings. A ``[w] `` prefix on a template string sets its weight.
``lists``
    list -> words or phrases: a list (uniform) or a ``{item: weight}`` mapping. A list
    placeholder draws afresh at every use.
``entities``
    entity -> weighted groups; a group maps each field to a fixed string, a list, a mapping or
    ``"@list"``. An entity's group is drawn at the first use of any of its fields, and each
    field's value at that field's first use; both are then kept for the rest of the text, so a
    hero keeps one name and one set of pronouns.

Placeholders: ``{rule}``, ``{list}``, ``{entity.field}``; the prefix ``^`` capitalises the first
letter and ``a:`` prepends the indefinite article: ``{^a:adj}`` gives "An old".

Compilation inlines the rules (recursion is refused) into a DAG of states whose edges emit a
literal, draw from a list, read or draw an entity field, or emit nothing. A list edge is
shorthand for one parallel edge per item. The machine's full state is (DAG state, entity
registers); the registers range over finite sets, so it is a finite-state automaton: the
product with the registers is what replicating the story per choice of hero would build, and
it is never materialised -- the forward algorithm visits only the states the text allows.
"""

import bisect
import hashlib
import heapq
import itertools
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

EPS, LIT, SLOT, ENT, _RULE = 0, 1, 2, 3, 4
_SECTIONS = ("rules", "lists", "entities")
_TOP_KEYS = {"name", "version", "start", "description", *_SECTIONS}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_REF = re.compile(r"(\^?)(a:)?([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?")
_WEIGHT = re.compile(r"\[(\d+(?:\.\d*)?)\] (.*)", re.S)
# The article follows the sound, not the letter: "a unicorn", "an hour".
_A_PREFIXES = ("uni", "use", "usu", "eu", "one", "once")
_AN_PREFIXES = ("hour", "honest", "honor", "heir")
# libyaml is several times faster than the pure-Python parser; loading must stay well < 0.5 s.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Edge = tuple[int, int, Any, float]  # (target state, kind, payload, log prob of taking it)


def _article(word: str) -> str:
    low = word.lower()
    if low.startswith(_AN_PREFIXES):
        return "an"
    if low.startswith(_A_PREFIXES):
        return "a"
    return "an" if low[:1] in ("a", "e", "i", "o", "u") else "a"


def _transform(item: str, mods: str) -> str:
    if "a" in mods:
        item = f"{_article(item)} {item}"
    if "^" in mods:
        item = item[:1].upper() + item[1:]
    return item


def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == -math.inf:
        return a
    return a + math.log1p(math.exp(b - a))


class _Table:
    """A categorical distribution over emitted strings, indexed for prefix matching."""

    __slots__ = ("items", "cum", "logp", "_index", "_short")

    def __init__(self, items: tuple[str, ...], weights: tuple[float, ...]) -> None:
        total = math.fsum(weights)
        self.items = items
        self.cum = tuple(itertools.accumulate(weights))
        self.logp = tuple(math.log(w / total) for w in weights)
        # Bucket by the first two characters so matching a text position checks few items.
        self._index: dict[str, list[int]] = {}
        self._short: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            bucket = self._index if len(item) >= 2 else self._short
            bucket.setdefault(item[:2], []).append(i)

    def sample(self, rng: random.Random) -> int:
        # min() guards the rare float rounding of random() * total up to total itself.
        i = bisect.bisect_right(self.cum, rng.random() * self.cum[-1])
        return min(i, len(self.items) - 1)

    def matches(self, text: str, pos: int) -> list[int]:
        items = self.items
        hits = [
            i for i in self._index.get(text[pos : pos + 2], ()) if text.startswith(items[i], pos)
        ]
        if self._short:
            hits.extend(self._short.get(text[pos : pos + 1], ()))
        return hits


class _Entity:
    __slots__ = ("name", "fields", "groups", "values", "tables")

    def __init__(self, name: str, fields: tuple[str, ...], groups: _Table, values: list) -> None:
        self.name = name
        self.fields = fields
        self.groups = groups
        self.values: list[list[tuple[tuple[str, ...], tuple[float, ...]]]] = values
        self.tables: dict[tuple[int, int, str], _Table] = {}  # (group, field, mods) -> table


def _weighted(where: str, value: Any) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if isinstance(value, str):
        pairs = [(value, 1.0)]
    elif isinstance(value, list):
        pairs = [(item, 1.0) for item in value]
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ValueError(f"{where}: expected a string, list or mapping, got {value!r}")
    for item, weight in pairs:
        # YAML reads bare yes/no/on/null as non-strings; insist on strings to catch that.
        if not isinstance(item, str) or not item:
            raise ValueError(f"{where}: items must be non-empty strings (quote it), got {item!r}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ValueError(f"{where}: weight of {item!r} must be a positive number")
        if not math.isfinite(weight):
            raise ValueError(f"{where}: weight of {item!r} must be finite")
    if not pairs:
        raise ValueError(f"{where}: is empty")
    items = [p[0] for p in pairs]
    dups = sorted({x for x in items if items.count(x) > 1})
    if dups:  # a repeat would silently double that item's probability
        raise ValueError(f"{where}: duplicate items {dups}")
    return tuple(p[0] for p in pairs), tuple(float(p[1]) for p in pairs)


def _weighted_template(where: str, text: str, weight: Any = None) -> tuple[str, float]:
    m = _WEIGHT.fullmatch(text)
    if m is not None:
        if weight is not None:
            raise ValueError(f"{where}: both a [w] prefix and a weight on {text!r}")
        text, weight = m.group(2), float(m.group(1))
    weight = 1.0 if weight is None else weight
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise ValueError(f"{where}: weight must be a positive number, got {weight!r}")
    return text, float(weight)


def _alternatives(name: str, value: Any) -> list[tuple[str, float]]:
    where = f"rules.{name}"
    alts: list[tuple[str, float]] = []
    if isinstance(value, str):
        for line in value.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                alts.append(_weighted_template(where, line))
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                alts.append(_weighted_template(where, item))
            elif isinstance(item, dict) and set(item) <= {"text", "weight"} and "text" in item:
                if not isinstance(item["text"], str):
                    raise ValueError(f"{where}: text must be a string, got {item['text']!r}")
                alts.append(_weighted_template(where, item["text"], item.get("weight")))
            else:
                raise ValueError(f"{where}: bad alternative {item!r}")
    else:
        raise ValueError(f"{where}: expected a block string or a list, got {value!r}")
    if not alts:
        raise ValueError(f"{where}: has no alternatives")
    total = math.fsum(w for _, w in alts)
    return [(text, w / total) for text, w in alts]


def read_spec(path: Path) -> tuple[dict[str, Any], str]:
    """Read and merge the grammar's YAML files.

    Args:
        path: a YAML file, or a directory whose ``*.yaml`` files are merged.

    Returns:
        The merged spec and a sha256 fingerprint of the files' names and bytes.
    """
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.yaml grammar files in {path}")
    spec: dict[str, Any] = {key: {} for key in _SECTIONS}
    digest = hashlib.sha256()
    for file in files:
        # Line endings normalised: a checkout with CRLF (git's autocrlf on Windows) holds the
        # same grammar, so the same stories, and must give the same fingerprint (so run keys).
        raw = file.read_bytes().replace(b"\r\n", b"\n")
        digest.update(file.name.encode() + b"\0" + raw + b"\0")
        doc = yaml.load(raw, Loader=_LOADER) or {}
        if not isinstance(doc, dict) or set(doc) - _TOP_KEYS:
            raise ValueError(f"{file}: top-level keys must be among {sorted(_TOP_KEYS)}")
        for key, value in doc.items():
            if key in _SECTIONS:
                if not isinstance(value, dict):
                    raise ValueError(f"{file}: {key} must be a mapping")
                clash = spec[key].keys() & value.keys()
                if clash:
                    raise ValueError(f"{file}: {key} {sorted(clash)} defined twice")
                spec[key].update(value)
            elif key in spec:
                raise ValueError(f"{file}: {key!r} defined twice")
            else:
                spec[key] = value
    return spec, digest.hexdigest()


class Automaton:
    """The compiled grammar: a DAG of states with weighted emitting edges plus registers."""

    def __init__(self, spec: dict[str, Any]) -> None:
        """Compile a spec (see the module docstring) into an automaton.

        Args:
            spec: the merged YAML data, as returned by `read_spec`.

        Raises:
            ValueError: the data is malformed, a name is unknown or a rule is recursive.
        """
        rules, lists, entities = (spec.get(key) or {} for key in _SECTIONS)
        clash = (lists.keys() & rules.keys()) | (lists.keys() | rules.keys()) & entities.keys()
        if clash:
            raise ValueError(f"names used twice across rules/lists/entities: {sorted(clash)}")
        self._lists = {name: _weighted(f"lists.{name}", v) for name, v in lists.items()}
        self._rules = {name: _alternatives(name, v) for name, v in rules.items()}
        self._used: set[str] = set()
        self._entity_ids: dict[str, int] = {}
        self.entities: list[_Entity] = []
        for name, groups in entities.items():
            self._entity_ids[name] = len(self.entities)
            self.entities.append(self._entity(name, groups))
        self.tables: list[_Table] = []
        self._table_ids: dict[tuple[str, str], int] = {}
        self._parsed: dict[str, list[tuple[int, Any]]] = {}
        self._out: list[list[Edge]] = []
        self.start, self.final = self._new_state(), self._new_state()
        start = spec.get("start")
        if start not in self._rules:
            raise ValueError(f"start: {start!r} is not a rule")
        self._add_rule(start, self.start, self.final, ())
        self.edges: tuple[tuple[Edge, ...], ...] = tuple(tuple(out) for out in self._out)
        self.cum = tuple(
            tuple(itertools.accumulate(math.exp(e[3]) for e in out)) for out in self.edges
        )
        for state, out in enumerate(self.edges):
            mass = math.fsum(math.exp(e[3]) for e in out)
            if state != self.final and not math.isclose(mass, 1.0, abs_tol=1e-9):
                raise AssertionError(f"state {state}: outgoing probability {mass} != 1")
        self.rank = self._topological_rank()
        self.unused = tuple(
            sorted((lists.keys() | rules.keys() | entities.keys()) - self._used - {start})
        )
        self.vocabulary = self._vocabulary()

    # -- compilation --------------------------------------------------------------------------

    def _entity(self, name: str, groups: Any) -> _Entity:
        if not isinstance(groups, list) or not groups:
            raise ValueError(f"entities.{name}: expected a non-empty list of groups")
        fields: tuple[str, ...] | None = None
        weights, values = [], []
        for k, group in enumerate(groups):
            where = f"entities.{name}[{k}]"
            if not isinstance(group, dict):
                raise ValueError(f"{where}: expected a mapping of fields")
            group = dict(group)
            weights.append(group.pop("weight", 1))
            names = tuple(sorted(group))
            if fields is not None and names != fields:
                raise ValueError(f"{where}: fields {names} differ from the first group's {fields}")
            fields = names
            row = []
            for field in names:
                value = group[field]
                if isinstance(value, str) and value.startswith("@"):
                    if value[1:] not in self._lists:
                        raise ValueError(f"{where}.{field}: unknown list {value!r}")
                    self._used.add(value[1:])
                    row.append(self._lists[value[1:]])
                else:
                    row.append(_weighted(f"{where}.{field}", value))
            values.append(row)
        labels = tuple(str(k) for k in range(len(groups)))
        _, group_weights = _weighted(
            f"entities.{name} weights", dict(zip(labels, weights, strict=True))
        )
        return _Entity(name, fields or (), _Table(labels, group_weights), values)

    def _new_state(self) -> int:
        self._out.append([])
        return len(self._out) - 1

    def _table_id(self, name: str, mods: str) -> int:
        key = (name, mods)
        if key not in self._table_ids:
            items, weights = self._lists[name]
            self._table_ids[key] = len(self.tables)
            self.tables.append(_Table(tuple(_transform(x, mods) for x in items), weights))
        return self._table_ids[key]

    def _parse(self, template: str, rule: str) -> list[tuple[int, Any]]:
        if template in self._parsed:
            return self._parsed[template]
        parts: list[tuple[int, Any]] = []
        pos = 0
        for m in [*_PLACEHOLDER.finditer(template), None]:
            literal = template[pos : m.start() if m else len(template)]
            if "{" in literal or "}" in literal:
                raise ValueError(f"rules.{rule}: unbalanced brace in {template!r}")
            if literal:
                parts.append((LIT, literal))
            if m is None:
                break
            pos = m.end()
            ref = _REF.fullmatch(m.group(1))
            if ref is None:
                raise ValueError(f"rules.{rule}: bad placeholder {m.group(0)!r}")
            cap, art, name, field = ref.groups()
            mods = cap + ("a" if art else "")
            self._used.add(name)
            if field is not None:
                parts.append((ENT, self._entity_ref(name, field, mods, rule)))
            elif name in self._rules:
                if mods:
                    raise ValueError(f"rules.{rule}: {m.group(0)!r}: no ^ or a: on a rule")
                parts.append((_RULE, name))
            elif name in self._lists:
                parts.append((SLOT, self._table_id(name, mods)))
            else:
                raise ValueError(f"rules.{rule}: unknown name in {m.group(0)!r}")
        self._parsed[template] = parts
        return parts

    def _entity_ref(self, name: str, field: str, mods: str, rule: str) -> tuple[int, int, str]:
        if name not in self._entity_ids:
            raise ValueError(f"rules.{rule}: unknown entity {name!r}")
        e = self._entity_ids[name]
        ent = self.entities[e]
        if field not in ent.fields:
            raise ValueError(f"rules.{rule}: entity {name!r} has no field {field!r}")
        f = ent.fields.index(field)
        for g, row in enumerate(ent.values):
            if (g, f, mods) not in ent.tables:
                items, weights = row[f]
                ent.tables[g, f, mods] = _Table(tuple(_transform(x, mods) for x in items), weights)
        return e, f, mods

    def _add_rule(self, name: str, src: int, dst: int, stack: tuple[str, ...]) -> None:
        """Add edges from src to dst that emit exactly the rule's language, once each."""
        if name in stack:
            raise ValueError(f"recursive rule: {' -> '.join((*stack, name))}")
        alts = self._rules[name]
        for template, prob in alts:
            parts = self._parse(template, name)
            logp = math.log(prob)
            if not parts:
                self._out[src].append((dst, EPS, None, logp))
                continue
            cur = src
            if parts[0][0] == _RULE and len(alts) > 1:
                # The choice needs its own edge: the sub-rule's edges carry its own choices.
                cur = self._new_state()
                self._out[src].append((cur, EPS, None, logp))
                logp = 0.0
            for i, (kind, payload) in enumerate(parts):
                nxt = dst if i == len(parts) - 1 else self._new_state()
                if kind == _RULE:
                    self._add_rule(payload, cur, nxt, (*stack, name))
                else:
                    self._out[cur].append((nxt, kind, payload, logp))
                    logp = 0.0
                cur = nxt

    def _topological_rank(self) -> list[int]:
        indegree = [0] * len(self.edges)
        for out in self.edges:
            for edge in out:
                indegree[edge[0]] += 1
        rank = [-1] * len(self.edges)
        ready = [s for s, d in enumerate(indegree) if d == 0]
        for r, state in enumerate(_drain(ready)):
            rank[state] = r
            for edge in self.edges[state]:
                indegree[edge[0]] -= 1
                if indegree[edge[0]] == 0:
                    ready.append(edge[0])
        return rank

    def _vocabulary(self) -> frozenset[str]:
        texts = [e[2] for out in self.edges for e in out if e[1] == LIT]
        texts += [x for t in self.tables for x in t.items]
        texts += [x for ent in self.entities for t in ent.tables.values() for x in t.items]
        return frozenset(w for text in texts for w in re.findall(r"[a-z]+", text.lower()))

    # -- use ----------------------------------------------------------------------------------

    def sample(self, rng: random.Random) -> str:
        """Walk from start to final, drawing each choice from rng; return the emitted text."""
        edges_of, cum_of, tables, ents = self.edges, self.cum, self.tables, self.entities
        groups = [-1] * len(ents)
        values = [[-1] * len(ent.fields) for ent in ents]
        out: list[str] = []
        state, final = self.start, self.final
        while state != final:
            edges = edges_of[state]
            if len(edges) == 1:
                state, kind, payload, _ = edges[0]
            else:
                cum = cum_of[state]
                i = bisect.bisect_right(cum, rng.random() * cum[-1])
                state, kind, payload, _ = edges[min(i, len(edges) - 1)]
            if kind == LIT:
                out.append(payload)
            elif kind == SLOT:
                table = tables[payload]
                out.append(table.items[table.sample(rng)])
            elif kind == ENT:
                e, f, mods = payload
                g = groups[e]
                if g < 0:
                    g = groups[e] = ents[e].groups.sample(rng)
                table = ents[e].tables[g, f, mods]
                v = values[e][f]
                if v < 0:
                    v = values[e][f] = table.sample(rng)
                out.append(table.items[v])
        return "".join(out)

    def log_prob(self, text: str) -> float:
        """Forward algorithm: the natural-log probability that `sample` emits exactly text."""
        return self.forward(text)[0]

    def forward(self, text: str) -> tuple[float, int]:
        """The forward algorithm over `text`: (log P(text), the longest valid prefix).

        The prefix is the most characters of `text` that some partial derivation emits, so
        `text[:n]` begins a story the grammar can write: cut at a word boundary inside the
        grammar's fixed text, or where one of its choices (a word, a name) ends. n == len(text)
        for every text with a finite log probability.
        """
        edges_of, rank, tables, ents = self.edges, self.rank, self.tables, self.entities
        # pending[pos][(state, registers)] = log prob of emitting text[:pos] and being there.
        pending: dict[int, dict[tuple[int, tuple], float]] = {
            0: {(self.start, (None,) * len(ents)): 0.0}
        }
        positions = [0]
        total = -math.inf

        def advance(pos: int, key: tuple[int, tuple], logp: float) -> None:
            bucket = pending.get(pos)
            if bucket is None:
                bucket = pending[pos] = {}
                heapq.heappush(positions, pos)
            old = bucket.get(key)
            bucket[key] = logp if old is None else _logaddexp(old, logp)

        reached = 0
        while positions:
            pos = heapq.heappop(positions)
            layer = pending.pop(pos)
            reached = max(reached, pos)
            # Epsilon edges stay at pos but always lead to a later rank; popping in rank order
            # finishes every key's sum before its edges are followed.
            counter = itertools.count()
            queue = [(rank[key[0]], next(counter), key) for key in layer]
            heapq.heapify(queue)
            while queue:
                key = heapq.heappop(queue)[2]
                state, regs = key
                logp = layer[key]
                if state == self.final:
                    if pos == len(text):
                        total = _logaddexp(total, logp)
                    continue
                for target, kind, payload, edge_logp in edges_of[state]:
                    lp = logp + edge_logp
                    if kind == LIT:
                        if text.startswith(payload, pos):
                            advance(pos + len(payload), (target, regs), lp)
                        else:
                            reached = max(reached, pos + _words_matched(payload, text, pos))
                    elif kind == SLOT:
                        table = tables[payload]
                        for i in table.matches(text, pos):
                            advance(pos + len(table.items[i]), (target, regs), lp + table.logp[i])
                    elif kind == ENT:
                        for npos, new_regs, step in _entity_steps(ents, payload, regs, text, pos):
                            advance(npos, (target, new_regs), lp + step)
                    else:
                        new_key = (target, regs)
                        if new_key in layer:
                            layer[new_key] = _logaddexp(layer[new_key], lp)
                        else:
                            layer[new_key] = lp
                            heapq.heappush(queue, (rank[target], next(counter), new_key))
        return total, reached


def _words_matched(literal: str, text: str, pos: int) -> int:
    """How many characters of `literal` text[pos:] repeats, in whole words: up to the end of
    the last space or punctuation mark before they differ (0 when none)."""
    n = 0
    limit = min(len(literal), len(text) - pos)
    while n < limit and literal[n] == text[pos + n]:
        n += 1
    while n > 0 and literal[n - 1].isalnum():
        n -= 1
    return n


def _entity_steps(
    ents: list[_Entity], payload: tuple[int, int, str], regs: tuple, text: str, pos: int
) -> Iterator[tuple[int, tuple, float]]:
    """Yield (next position, next registers, log prob) for an entity edge read at text[pos:]."""
    e, f, mods = payload
    ent = ents[e]
    reg = regs[e]
    if reg is None:  # first use of the entity: draw the group, then the field's value
        unbound = (-1,) * len(ent.fields)
        for g in range(len(ent.values)):
            table = ent.tables[g, f, mods]
            for i in table.matches(text, pos):
                vals = unbound[:f] + (i,) + unbound[f + 1 :]
                new = regs[:e] + ((g, vals),) + regs[e + 1 :]
                yield pos + len(table.items[i]), new, ent.groups.logp[g] + table.logp[i]
        return
    g, vals = reg
    table = ent.tables[g, f, mods]
    if vals[f] >= 0:  # bound: the same value again, with probability one
        item = table.items[vals[f]]
        if text.startswith(item, pos):
            yield pos + len(item), regs, 0.0
        return
    for i in table.matches(text, pos):
        new = regs[:e] + ((g, vals[:f] + (i,) + vals[f + 1 :]),) + regs[e + 1 :]
        yield pos + len(table.items[i]), new, table.logp[i]


def _drain(ready: list[int]) -> Iterator[int]:
    # Kahn's algorithm appends to `ready` while we iterate; index instead of a for loop.
    i = 0
    while i < len(ready):
        yield ready[i]
        i += 1
