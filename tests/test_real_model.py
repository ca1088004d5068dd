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
