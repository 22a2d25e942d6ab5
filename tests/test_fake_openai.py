"""The fake OpenAI upstream speaks the wire format the official SDK expects: each endpoint
keybroker's proxy tests rely on, driven by ``openai`` itself, with no keybroker in between."""

from __future__ import annotations

import io
import json

import openai
import pytest

from tests.fake_openai import (
    CHAT_USAGE,
    EMBEDDING_DIMENSIONS,
    REPLY_DELTAS,
    REPLY_TEXT,
    RESPONSE_USAGE,
    FakeOpenAI,
    embedding_vector,
    openai_error,
)

KEY = "sk-proj-alice-real-upstream-key-0123456789"


@pytest.fixture
def client(fake_openai: FakeOpenAI) -> openai.OpenAI:
    fake_openai.valid_keys.add(KEY)
    return openai.OpenAI(base_url=f"{fake_openai.url}/v1", api_key=KEY, max_retries=0)


def test_chat_answers_json_echoing_the_model(
    client: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == REPLY_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == CHAT_USAGE
    seen = fake_openai.requests[-1]
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert fake_openai.seen_keys() == [KEY]


async def test_chat_answers_the_async_client(fake_openai: FakeOpenAI) -> None:
    fake_openai.valid_keys.add(KEY)
    async with openai.AsyncOpenAI(
        base_url=f"{fake_openai.url}/v1", api_key=KEY, max_retries=0
    ) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert completion.choices[0].message.content == REPLY_TEXT


def test_streamed_chat_ends_with_usage_when_asked(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert text == REPLY_DELTAS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == CHAT_USAGE
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_chat_has_no_usage_unless_asked(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_responses_answers_json(client: openai.OpenAI) -> None:
    answer = client.responses.create(model="gpt-4o-mini", input="hi")
    assert answer.id.startswith("resp_")
    assert answer.status == "completed"
    assert answer.model == "gpt-4o-mini"
    assert answer.output_text == REPLY_TEXT
    assert answer.usage is not None
    assert answer.usage.model_dump(exclude_none=True) == RESPONSE_USAGE


def test_responses_stream_typed_events_and_a_final_usage(client: openai.OpenAI) -> None:
    with client.responses.stream(model="gpt-4o-mini", input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert final.output_text == REPLY_TEXT
    assert final.usage is not None
    assert final.usage.model_dump(exclude_none=True) == RESPONSE_USAGE


def test_responses_create_stream_parses_each_event(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas == REPLY_DELTAS
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.total_tokens == RESPONSE_USAGE["total_tokens"]


def test_embeddings_decode_from_base64_and_floats(
    client: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    by_default = client.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
    assert json.loads(fake_openai.requests[-1].body)["encoding_format"] == "base64"
    assert [item.embedding for item in by_default.data] == [
        embedding_vector(0, EMBEDDING_DIMENSIONS),
        embedding_vector(1, EMBEDDING_DIMENSIONS),
    ]
    assert by_default.usage.prompt_tokens == 3
    as_floats = client.embeddings.create(
        model="text-embedding-3-small", input="one", encoding_format="float", dimensions=4
    )
    assert as_floats.data[0].embedding == embedding_vector(0, 4)


def test_models_are_listed(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert "gpt-4o-mini" in ids


def test_a_file_is_uploaded_as_multipart(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    content = b'{"prompt": "hi"}\n' * 100
    uploaded = client.files.create(file=("batch.jsonl", io.BytesIO(content)), purpose="batch")
    assert uploaded.id.startswith("file-")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (
        len(content),
        "batch.jsonl",
        "batch",
    )
    assert [(u.filename, u.purpose, u.size) for u in fake_openai.uploads] == [
        ("batch.jsonl", "batch", len(content))
    ]


def test_a_wrong_key_is_refused_and_never_echoed_whole(fake_openai: FakeOpenAI) -> None:
    wrong = "sk-proj-mallory-guessed-this-key-9876"
    client = openai.OpenAI(base_url=f"{fake_openai.url}/v1", api_key=wrong, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.models.list()
    assert refused.value.status_code == 401
    assert refused.value.code == "invalid_api_key"
    assert wrong not in str(refused.value.body)
    assert wrong[-4:] in str(refused.value.body)


def test_a_scripted_429_raises_rate_limit_error(
    client: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    fake_openai.answer_next(
        429,
        openai_error("Rate limit reached", "requests", code="rate_limit_exceeded"),
        retry_after="1",
    )
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert limited.value.code == "rate_limit_exceeded"
    assert limited.value.response.headers["retry-after"] == "1"
    assert client.models.list().data  # the script was for one answer only


def test_an_unknown_path_is_404_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.get("/nowhere", cast_to=object)
    assert missing.value.body == {
        "message": "Invalid URL (GET /v1/nowhere)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
