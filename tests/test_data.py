import json

import pytest

from mlx_surgical.batches import BatchStream, bucket, collate
from mlx_surgical.data import Record, inline_records, read_records, record_problems, sample_path, to_messages
from mlx_surgical.errors import UserError
from mlx_surgical.model import load_tokenizer
from mlx_surgical.prompt import PromptFormat, encode_records


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def test_bundled_data_has_about_120_pairs_split_three_ways():
    counts = {split: len(read_records(sample_path(split))) for split in ("train", "valid", "test")}
    assert sum(counts.values()) == 120 and min(counts.values()) >= 8
    train_prompts = {r.fields["instruction"] for r in read_records(sample_path("train"))}
    assert not train_prompts & {r.fields["instruction"] for r in read_records(sample_path("test"))}


@pytest.mark.parametrize("row, user, answer", [
    ({"instruction": "Do it", "response": "Done"}, "Do it", "Done"),
    ({"instruction": "Add", "input": "1 + 2", "output": "3"}, "Add\n\n1 + 2", "3"),
    ({"prompt": "Q", "completion": "A"}, "Q", "A"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "Hi", "Hello"),
])
def test_every_accepted_shape_becomes_messages(row, user, answer):
    messages, has_answer = to_messages(inline_records([row], "x")[0])
    assert has_answer and messages[-2]["content"] == user and messages[-1]["content"] == answer


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": \n')
    with pytest.raises(UserError, match=r"train.jsonl:2: malformed JSON line"):
        read_records(path)


def test_missing_field_and_empty_file_are_named(tmp_path):
    with pytest.raises(UserError, match=r"x\[0\]: field 'response' must be a non-empty string"):
        to_messages(inline_records([{"instruction": "a"}], "x")[0])
    with pytest.raises(UserError, match=r"x\[0\]: no known fields"):
        to_messages(inline_records([{"question": "a"}], "x")[0])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    from mlx_surgical.data import check_records

    with pytest.raises(UserError, match="empty.jsonl: no examples"):
        check_records(read_records(empty), str(empty))


def test_llama2_prompt_and_response_only_mask(tokenizer):
    fmt = PromptFormat(tokenizer)
    assert fmt.style == "llama2"  # like CodeLlama-Instruct, the tiny tokenizer has no template
    messages = [{"role": "user", "content": "Write add"}, {"role": "assistant", "content": "def add(a, b): ..."}]
    ids, start = fmt.example_ids(messages, True)
    assert tokenizer.decode(ids[:start]) == "<s> [INST] Write add [/INST]"
    assert tokenizer.decode(ids[start:]).strip() == "def add(a, b): ... </s>".replace(" </s>", "</s>")
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    batch = collate(encode_records(inline_records([{"instruction": "Write add", "response": "def add(a, b): ..."}],
                                                  "x"), fmt, 512, "truncate", True).samples, 512)
    learned = batch.targets.reshape(-1)[batch.loss_index[batch.loss_weight > 0]]
    assert list(learned) == ids[start:]


def test_overlength_is_truncated_skipped_or_refused(tokenizer):
    fmt = PromptFormat(tokenizer)
    rows = inline_records([{"instruction": "short", "response": "word " * 200},
                           {"instruction": "long " * 200, "response": "x"}], "data.examples")
    truncated = encode_records(rows, fmt, 64, "truncate", True)
    assert truncated.truncated == ["data.examples[0]"] and len(truncated.samples[0].ids) == 64
    # A prompt that fills the context would leave an empty answer: it is left out, never trained.
    assert truncated.skipped == ["data.examples[1]"]
    skipped = encode_records(rows, fmt, 64, "skip", True)
    assert skipped.samples == [] and len(skipped.skipped) == 2
    with pytest.raises(UserError, match=r"data.examples\[0\]: example is \d+ tokens, longer than"):
        encode_records(rows, fmt, 64, "error", True)


def test_batch_order_is_a_function_of_seed_and_position(tokenizer):
    fmt = PromptFormat(tokenizer)
    samples = encode_records(read_records(sample_path("train")), fmt, 512, "truncate", True).samples
    a, b = BatchStream(samples, 2, 7, 512), BatchStream(samples, 2, 7, 512)
    positions = [0, 51, 52, 130, 3]
    assert [a.indices(p) for p in positions] == [b.indices(p) for p in positions]
    epoch = [i for p in range(a.per_epoch) for i in a.indices(p)]
    assert sorted(epoch) == list(range(len(samples)))
    assert [a.indices(p) for p in range(a.per_epoch)] != [a.indices(p) for p in range(a.per_epoch, 2 * a.per_epoch)]
    batch = a.batch(0)
    width, slots = batch.inputs.shape[1], batch.loss_index.size
    assert width == bucket(width) and slots == bucket(slots)
    assert batch.loss_weight.sum() == sum(len(samples[i].ids) - samples[i].loss_start for i in a.indices(0))


def test_json_list_files_are_read(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "hello"}]))
    assert read_records(path)[0].origin == f"{path}[0]"


def test_the_chat_template_is_used_when_the_tokenizer_has_one(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer._tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fmt = PromptFormat(tokenizer)
    assert fmt.style == "chat_template"
    messages = [{"role": "user", "content": "Write add"}, {"role": "assistant", "content": "def add(a, b): ..."}]
    ids, start = fmt.example_ids(messages, True)
    assert tokenizer.decode(ids[:start]) == "<|user|>Write add\n<|assistant|>"
    assert tokenizer.decode(ids[start:]).startswith("def add(a, b): ...")
    assert ids[-1] == tokenizer.eos_token_id
    assert PromptFormat(tokenizer, "llama2").style == "llama2"


def test_buckets_bound_padding_and_shapes():
    widths = [bucket(n) for n in range(1, 4097)]
    assert all(b >= n and b - n <= max(7, n / 16) for n, b in zip(range(1, 4097), widths))
    assert len(set(b for b in widths if 1024 < b <= 2048)) == 16


def test_every_bad_line_is_listed_up_to_a_limit(tmp_path):
    from mlx_surgical.data import MAX_PROBLEMS

    path = tmp_path / "train.jsonl"
    good = '{"instruction": "a", "response": "b"}'
    path.write_bytes("\n".join([good, "{oops", '{"instruction": "a"}', '{"instruction": "a", "response": ',
                                 '{"prompt": "q", "completion": "c"}']).encode()
                     + b'\n{"instruction": "caf\xe9", "response": "b"}\n')
    with pytest.raises(UserError) as bad:
        read_records(path)
    # the lines that parse are checked too: a missing field, a second format
    assert [p.split(": ")[0] for p in bad.value.problems] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "malformed JSON line" in bad.value.problems[0]
    assert "field 'response' must be a non-empty string" in bad.value.problems[1]
    assert "a prompt/completion example among instruction/response examples" in bad.value.problems[3]
    assert "not valid UTF-8 (byte 0xe9 at column 21)" in bad.value.problems[4]

    path.write_text("\n".join(["{"] * (MAX_PROBLEMS + 5)))
    with pytest.raises(UserError) as many:
        read_records(path)
    assert len(many.value.problems) == MAX_PROBLEMS + 1
    assert many.value.problems[-1] == "... and 5 more problems"


def test_every_bad_example_and_a_mixed_format_are_named(tmp_path):
    from mlx_surgical.data import check_records

    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [
        {"instruction": "a", "response": "b"}, {"instruction": "a"}, {"prompt": "q", "completion": "c"},
        {"instruction": "a", "response": ""}, {"instruction": "a", "response": "b"}]))
    with pytest.raises(UserError) as bad:
        check_records(read_records(path), str(path))
    assert bad.value.problems == [
        f"{path}:2: field 'response' must be a non-empty string",
        f"{path}:3: a prompt/completion example among instruction/response examples (as at {path}:1); "
        "use one format per file",
        f"{path}:4: field 'response' must be a non-empty string"]


def test_every_overlong_example_is_named_when_overlength_is_error(tokenizer):
    rows = inline_records([{"instruction": "short", "response": "word " * 200}, {"instruction": "a", "response": "b"},
                           {"instruction": "long " * 200, "response": "x"}], "data.examples")
    with pytest.raises(UserError) as bad:
        encode_records(rows, PromptFormat(tokenizer), 64, "error", True)
    assert [p.split(":")[0] for p in bad.value.problems] == ["data.examples[0]", "data.examples[2]"]


def test_a_conversation_without_a_request_is_named():
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(UserError, match=r"x\[0\]: no 'user' message before the answer"):
        to_messages(inline_records([row], "x")[0])


def test_a_line_nested_too_deeply_is_named_with_the_others(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n' + "[" * 100000 + "]" * 100000 + "\n{}\n")
    with pytest.raises(UserError) as e:
        read_records(path)
    assert "deep.jsonl:2: JSON nested too deeply" in str(e.value) and "deep.jsonl:3: no known fields" in str(e.value)


def test_a_chat_template_that_refuses_the_turns_names_the_example(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    # CodeLlama-Instruct's template has this check.
    tokenizer._tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}")
    turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(UserError, match=r"x\[0\]: the model's chat template refuses these messages "
                                        r"\(Conversation roles must alternate"):
        encode_records(inline_records([{"messages": turns}], "x"), PromptFormat(tokenizer), 512, "error", True)


def test_a_misspelled_field_is_named_beside_the_missing_one():
    problems = record_problems(Record({"instruction": "a", "respnse": "b"}, "x.jsonl:3"), None)
    assert problems == ["x.jsonl:3: field 'response' must be a non-empty string (is 'respnse' a misspelling of it?)"]
    assert record_problems(Record({"instruction": "a", "concept": "b"}, "x.jsonl:4"), None) == [
        "x.jsonl:4: field 'response' must be a non-empty string"]


def test_text_examples_and_unmasked_prompts_learn_every_token_and_the_system_prompt_is_asked(tokenizer):
    """README: a {"text": ...} example has its loss on every token; data.mask_prompt false puts
    the prompt's tokens in the loss too; data.system_prompt is part of every prompt."""
    text = "def double(x):\n    return 2 * x\n"
    pair = {"instruction": "Write double", "response": "def double(x): return 2 * x"}
    fmt = PromptFormat(tokenizer, "llama2", "Answer with code only.")
    records = inline_records([{"text": text}, pair], "data.examples")
    masked, unmasked = (encode_records(records, fmt, 512, "error", mask).samples for mask in (True, False))

    text_ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    assert masked[0].ids.tolist() == text_ids and masked[0].loss_start == 1
    prompt = fmt.prompt_ids([{"role": "user", "content": pair["instruction"]}])
    assert "<<SYS>>\nAnswer with code only.\n<</SYS>>" in tokenizer.decode(prompt)
    assert masked[1].ids.tolist()[:len(prompt)] == prompt and masked[1].loss_start == len(prompt)
    assert unmasked[1].ids.tolist() == masked[1].ids.tolist() and unmasked[1].loss_start == 1

    # Every next token after the first is learned: all but one position of each sample.
    batch = collate([masked[0], unmasked[1]], 512)
    assert int(batch.loss_weight.sum()) == len(masked[0].ids) - 1 + len(unmasked[1].ids) - 1
    assert int(collate([masked[1]], 512).loss_weight.sum()) == len(masked[1].ids) - len(prompt)
