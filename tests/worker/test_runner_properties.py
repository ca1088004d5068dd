"""Property: a packed step serves each session exactly as a step of its own.

`ModelRunner.forward` packs the new tokens of several sessions into one row;
decode tokens (one per session) are rotated together, those whose caches are
neighbouring rows of a shared pool block are written and attended in one
batched call, and prefill chunks are attended one by one. Whatever the mix,
each session's logits, evictions and cache contents must be those it gets
when fed alone through an identical copy of its cache (a copy with storage
of its own, outside any pool). Hypothesis draws the sessions (cache
geometry, eviction policy, pinned system prompt, rotary positions taken from
the slots or from the original text, pooled or not, the pool's block size),
their histories, and a sequence of packed steps with rollbacks (`truncate`)
between them; the twins are stepped alone alongside and compared after
every step.

Packed-versus-alone cannot see a fault shared by both (both run the same
code), so one more property checks every step against the library's own
attention: the untouched twin of the model, given the cache's rotated keys
and values as its past and the new tokens' rotary positions, must produce
the same logits for every new token.
"""

from __future__ import annotations

import copy
import inspect
import random
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, PreTrainedModel

from benchmarks.perplexity import NoRepositionCache, cache_shape
from tests.conftest import build_tiny
from worker.kv_pool import KVPool
from worker.model import LoadedModel
from worker.runner import ModelRunner
from worker.sink_cache import SinkCache

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
VOCAB = 49152  # the SmolLM2 tokenizer the tiny models are built for

# name -> (model type, config overrides) of the tiny models.
MODELS = {
    "llama": ("llama", {}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "llama-yarn": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 16.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 256,
            }
        },
    ),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "qwen3": ("qwen3", {}),
}
OTHER_MODELS = [name for name in MODELS if name != "llama"]

SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


@dataclass
class SessionSpec:
    sink: int
    window: int
    evict: int
    whole_turns: bool
    pin: int  # system prompt length pinned with `pin_through`; 0 for none
    keep_text_positions: bool  # rotary positions from the text, not the slot
    pooled: bool  # its storage is a row of the shared pool
    history: list[tuple[list[int], list[int]]]  # chunks fed before the steps

    @property
    def max_chunk(self) -> int:
        """The largest chunk the stepper would send: it always fits."""
        return min(self.window, self.sink + self.window - max(self.sink, self.pin))


@dataclass
class Item:
    session: int
    token_ids: list[int]
    turn_ids: list[int]


@dataclass
class Step:
    items: list[Item]
    truncate: dict[int, float] = field(default_factory=dict)  # share dropped
    all_logits: bool = False


@dataclass
class Scenario:
    sessions: list[SessionSpec]
    steps: list[Step]
    pool_rows: int  # rows per block of the pool the pooled caches share


def _tokens(draw: st.DrawFn, count: int) -> list[int]:
    """Random token ids from a drawn seed: the ids themselves need no shrinking."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    return [rng.randrange(VOCAB) for _ in range(count)]


def _turns(draw: st.DrawFn, count: int, turn: list[int]) -> list[int]:
    """Turn ids of a chunk: the current turn, maybe the next one from a split."""
    split = draw(st.integers(0, count))
    ids = [turn[0]] * split
    if split < count and draw(st.booleans()):
        turn[0] += 1
    return ids + [turn[0]] * (count - split)


@st.composite
def scenarios(draw: st.DrawFn, max_sessions: int = 6, max_steps: int = 5) -> Scenario:
    num_sessions = draw(st.integers(1, max_sessions))
    sessions = []
    turns = []
    for _ in range(num_sessions):
        sink = draw(st.integers(0, 4))
        window = draw(st.integers(4, 24))
        pin = draw(st.one_of(st.just(0), st.integers(0, (sink + window) // 2)))
        spec = SessionSpec(
            sink=sink,
            window=window,
            evict=draw(st.integers(1, 8)),
            whole_turns=draw(st.booleans()),
            pin=pin,
            keep_text_positions=draw(st.booleans()),
            pooled=draw(st.integers(0, 3)) > 0,
            history=[],
        )
        turn = [0]
        # The system prompt is turn 0 and the first chunk; the rest follows.
        if pin:
            spec.history.append((_tokens(draw, pin), [0] * pin))
            turn[0] = 1
        remaining = draw(st.integers(0, 3 * (sink + window)))
        while remaining > 0:
            size = draw(st.integers(1, min(remaining, spec.max_chunk)))
            spec.history.append((_tokens(draw, size), _turns(draw, size, turn)))
            remaining -= size
        sessions.append(spec)
        turns.append(turn)

    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        order = draw(st.permutations(range(num_sessions)))
        chosen = order[: draw(st.integers(1, num_sessions))]
        mode = draw(st.sampled_from(["decode", "prefill", "mixed", "mixed"]))
        items = []
        for k, s in enumerate(chosen):
            spec = sessions[s]
            # A mixed step has a decode token first, a chunk second, then any.
            if mode == "mixed":
                decode = k == 0 or (k > 1 and draw(st.booleans()))
            else:
                decode = mode == "decode"
            size = 1 if decode else draw(st.integers(2, spec.max_chunk))
            items.append(Item(s, _tokens(draw, size), _turns(draw, size, turns[s])))
        truncate = draw(
            st.dictionaries(
                st.sampled_from(chosen), st.floats(0, 1), max_size=len(chosen)
            )
        )
        steps.append(Step(items, truncate, draw(st.booleans())))
    return Scenario(sessions, steps, draw(st.integers(1, 4)))


def _twin(cache: SinkCache) -> SinkCache:
    return copy.deepcopy(cache, {id(cache.rotary): cache.rotary})


def _make_cache(loaded: LoadedModel, spec: SessionSpec, pool: KVPool) -> SinkCache:
    kind = NoRepositionCache if spec.keep_text_positions else SinkCache
    cache = kind(
        cache_shape(loaded),
        loaded.rotary,
        spec.sink,
        spec.window,
        spec.evict,
        whole_turns=spec.whole_turns,
        pool=pool if spec.pooled else None,
    )
    if spec.pin:
        cache.pin_through(spec.pin)
    return cache


def _assert_same_cache(packed: SinkCache, alone: SinkCache) -> None:
    assert packed.length == alone.length <= packed.cache_size
    assert packed.token_ids == alone.token_ids
    assert packed.turn_ids == alone.turn_ids
    assert packed.positions() == alone.positions()
    torch.testing.assert_close(packed.raw_keys(), alone.raw_keys(), **TOLERANCE)
    length = packed.length
    torch.testing.assert_close(
        packed.v[:, :, :length], alone.v[:, :, :length], **TOLERANCE
    )
    # Compare on copies: reading the rotated keys refreshes them, and the
    # originals must keep their stale slots for the next step to re-rotate.
    torch.testing.assert_close(
        _twin(packed).rotated_keys(), _twin(alone).rotated_keys(), **TOLERANCE
    )


def reference_logits(
    reference: PreTrainedModel, cache: SinkCache, token_ids: list[int]
) -> torch.Tensor:
    """Logits [T, V] of the library's attention over the cache as its past.

    The cache is copied and makes room as the runner would; its rotated keys
    and values become a `DynamicCache`, and the new tokens take the rotary
    positions of the slots they are about to fill.
    """
    cache = _twin(cache)
    cache.make_room(len(token_ids))
    start = cache.length
    where = cache.slot_positions(start, start + len(token_ids))
    if isinstance(where, slice):
        positions = torch.arange(where.start, where.stop)
    else:
        positions = where.clone()
    keys = cache.rotated_keys()
    past = DynamicCache()
    for layer in range(keys.shape[0]):
        past.update(
            keys[layer][None].clone(), cache.v[layer, :, :start][None].clone(), layer
        )
    parameters = inspect.signature(reference.forward).parameters
    past_name = "cache" if "cache" in parameters else "past_key_values"
    with torch.inference_mode():
        out = reference(
            input_ids=torch.tensor([token_ids]),
            position_ids=positions[None],
            use_cache=True,
            **{past_name: past},
        )
    return out.logits[0].float()


def check_scenario(
    loaded: LoadedModel,
    scenario: Scenario,
    reference: PreTrainedModel | None = None,
) -> None:
    """Step the sessions packed and their twins alone; they must agree.

    With a `reference` model, every packed step is also checked token by
    token against that model's own attention over the same cache.
    """
    runner = ModelRunner(loaded)
    pool = KVPool(cache_shape(loaded), scenario.pool_rows)
    caches = [_make_cache(loaded, spec, pool) for spec in scenario.sessions]
    if any(c.block is not None for c in caches):
        event("pooled caches in the step")
    # Histories go in packed rounds: chunk r of every session in round r.
    rounds = max(len(spec.history) for spec in scenario.sessions)
    for r in range(rounds):
        work = [
            (cache, *spec.history[r])
            for cache, spec in zip(caches, scenario.sessions, strict=True)
            if r < len(spec.history)
        ]
        runner.forward(work)
    twins = [_twin(c) for c in caches]
    for c, t in zip(caches, twins, strict=True):
        _assert_same_cache(c, t)
    if any(isinstance(c, NoRepositionCache) for c in caches):
        event("text positions in the step")

    for step in scenario.steps:
        for s, share in step.truncate.items():
            cache = caches[s]
            keep = cache.length - int(share * (cache.length - cache.num_pinned))
            cache.truncate(keep)
            twins[s].truncate(keep)

        sizes = [len(item.token_ids) for item in step.items]
        if len(sizes) > 1:
            kinds = {"decode" if size == 1 else "prefill" for size in sizes}
            event(f"packed step: {' and '.join(sorted(kinds))}")
        expected = []
        if reference is not None:
            expected = [
                reference_logits(reference, caches[i.session], i.token_ids)
                for i in step.items
            ]
        work = [(caches[i.session], i.token_ids, i.turn_ids) for i in step.items]
        pooled_decodes = {
            (id(c.block), c.row) for c, ids, _ in work if len(ids) == 1 and c.block
        }
        if any((block, row + 1) in pooled_decodes for block, row in pooled_decodes):
            event("decode tokens attended as one run of pool rows")
        logits, evictions = runner.forward(work, all_logits=step.all_logits)
        assert logits.shape[0] == (sum(sizes) if step.all_logits else len(sizes))
        assert torch.isfinite(logits).all()
        if any(evictions):
            event("evictions in the step")

        offset = 0
        for row, item in enumerate(step.items):
            size = len(item.token_ids)
            twin = twins[item.session]
            alone, alone_evictions = runner.forward(
                [(twin, item.token_ids, item.turn_ids)], all_logits=step.all_logits
            )
            if step.all_logits:
                got = logits[offset : offset + size]
            else:
                got = logits[row : row + 1]
            torch.testing.assert_close(got, alone, **TOLERANCE)
            assert evictions[row] == alone_evictions[0]
            if expected:
                want = expected[row] if step.all_logits else expected[row][-1:]
                torch.testing.assert_close(got, want, **TOLERANCE)
            offset += size
        for c, t in zip(caches, twins, strict=True):
            _assert_same_cache(c, t)


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, tuple[LoadedModel, PreTrainedModel]]:
    """Tiny random models by name: prepared for sinkserve, and the untouched
    twin that keeps the library's attention."""
    return {
        name: build_tiny(tokenizer, model_type, seed=seed, **overrides)
        for seed, (name, (model_type, overrides)) in enumerate(MODELS.items())
    }


@settings(max_examples=150, **SETTINGS)
@given(scenario=scenarios())
def test_packed_steps_match_each_session_alone(models, scenario):
    check_scenario(models["llama"][0], scenario)


@settings(max_examples=60, **SETTINGS)
@given(name=st.sampled_from(OTHER_MODELS), scenario=scenarios(max_sessions=4))
def test_packed_steps_match_alone_in_other_models(models, name, scenario):
    check_scenario(models[name][0], scenario)


@settings(max_examples=40, **SETTINGS)
@given(
    name=st.sampled_from(list(MODELS)),
    scenario=scenarios(max_sessions=4, max_steps=3),
)
def test_packed_steps_match_the_library_attention(models, name, scenario):
    loaded, reference = models[name]
    check_scenario(loaded, scenario, reference)
