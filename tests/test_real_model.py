"""SmolLM2-135M-Instruct itself, through gateway and worker."""

from __future__ import annotations

import io

import grpc
import pytest
from transformers import AutoModelForCausalLM

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation
from services.datasets import mtbench_questions
from services.embedded import embedded_stack
from services.replay import replay
from tests.worker.test_engine import reference_replies
from worker.engine import Engine, EngineConfig

QUESTIONS = [
    "What is the capital of France?",
    "Name two famous museums there.",
    "Which of them is older?",
]


async def test_greedy_matches_generate_on_smollm2(real_model, smollm2_path):
    reference = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    engine = Engine(real_model, EngineConfig())
    expected = reference_replies(engine, reference, QUESTIONS, 24)
    async with embedded_stack(engine) as stack:
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            conversation = Conversation(channel)
            await conversation.open(sampling=pb.SamplingParams(max_new_tokens=24))
            for question, want in zip(QUESTIONS, expected, strict=True):
                messages = [m async for m in conversation.ask(question)]
                got = [
                    m.token.token_id
                    for m in messages
                    if m.WhichOneof("kind") == "token"
                ]
                assert got == [t for t in want if t not in engine.end_ids]
            await conversation.close()
    assert "Paris" in real_model.tokenizer.decode(expected[0])


@pytest.mark.network
async def test_replay_with_evictions_still_knows_paris(real_model):
    questions = mtbench_questions()[:2]
    labelled = [(str(q.question_id), t) for q in questions for t in q.turns]
    engine = Engine(real_model, EngineConfig(sink_size=4, window_size=252))
    out = io.StringIO()
    async with embedded_stack(engine) as stack:
        records = await replay(
            stack.gateway_address,
            labelled,
            {"sampling": pb.SamplingParams(max_new_tokens=96)},
            ["What is the capital of France?"],
            out=out,
        )
    assert sum(len(r.evictions) for r in records) > 0
    assert all(r.end.stats.cache_length <= 256 for r in records)
    assert "Paris" in records[-1].reply
    assert "evicted" in out.getvalue()


def test_a_real_reply_survives_a_snapshot_and_can_still_be_cut(real_model):
    """SmolLM2 ends its replies with its end-of-turn marker: the session's
    snapshot restores, the restored reply cuts like the original, and both
    sessions go on alike."""
    from tests.worker.test_engine import run_turn
    from worker.session import EndReason, SamplingParams, TokenEvent
    from worker.snapshot import decode_snapshot, encode_snapshot

    def replies(engine, session, text):
        events = run_turn(engine, session, text)
        return [e.token_id for e in events if isinstance(e, TokenEvent)], events[-1]

    engine = Engine(real_model, EngineConfig())
    session = engine.open_session(None, SamplingParams(max_new_tokens=48))
    _, end = replies(engine, session, QUESTIONS[0])
    assert end.reason is EndReason.STOP
    blob = encode_snapshot(session, real_model.fingerprint)
    other = Engine(real_model, EngineConfig())
    vocab = real_model.model.get_input_embeddings().num_embeddings
    restored = decode_snapshot(
        blob, real_model.fingerprint, other.cache_shape, real_model.rotary, vocab
    )
    other.adopt_session(restored)
    for eng, sess in ((engine, session), (other, restored)):
        eng.interrupt(sess.session_id, heard_tokens=2)
    (mine, my_end), (theirs, their_end) = (
        replies(other, restored, QUESTIONS[1]),
        replies(engine, session, QUESTIONS[1]),
    )
    assert mine == theirs and my_end.text == their_end.text
