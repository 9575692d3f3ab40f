"""demo.lookup_probe: its rows ask for the option that holds a value and end with that option's letter."""
from pathlib import Path

import numpy as np
import pytest

from demo.lookup_probe import LETTERS, LookupRows, parse_schedule
from instit_jax.loading import load_tokenizer

TOKENIZER = Path(__file__).parent.parent / "demo" / "base" / "tokenizer.json"


@pytest.fixture(scope="module")
def rows():
    return LookupRows(load_tokenizer(str(TOKENIZER)))


def test_rows_end_with_the_letter_of_the_option_that_holds_the_asked_value(rows):
    rng = np.random.default_rng(0)
    for n in (2, 3, 4):
        for _ in range(50):
            ids, k = rows.row(rng, n)
            text = rows.tok.decode(ids[1:-1], skip_special_tokens=False)
            lines = text.split("\n")
            options = dict(line.split(". ", 1) for line in lines[:n])
            asked = lines[n].removeprefix("Which option says ").removesuffix("?")
            assert list(options) == list(LETTERS[:n]) and len(set(options.values())) == n
            assert options[LETTERS[k]] == asked and ids[-1] == rows.answer_ids[k]
            assert ids[0] == rows.bos and len(ids) <= rows.length


def test_batch_masks_and_probes(rows):
    x, w, attn = rows.batch(np.random.default_rng(1), 0, 16, "answer")
    ends = attn.sum(1) - 1
    assert np.all(w.sum(1) == 1) and np.all(w[np.arange(16), ends] == 1)
    assert np.all(np.isin(x[np.arange(16), ends], rows.answer_ids))
    _, w_all, attn_all = rows.batch(np.random.default_rng(1), 0, 16, "all")
    assert np.all(w_all.sum(1) == attn_all.sum(1) - 1)  # every token after <s>
    (px, pattn), answers = rows.bench_probe(0, count=8)
    assert px.shape == pattn.shape and np.all(pattn[:, -1] == 1) and set(answers) <= {0, 1, 2, 3}
    text = rows.tok.decode(px[0][pattn[0] > 0].tolist(), skip_special_tokens=False)
    assert text.rstrip().endswith("ASSISTANT:") and "\nD. " in text


def test_schedule_errors_name_the_part():
    assert parse_schedule("2:300,0:700") == [(2, 300), (0, 700)]
    with pytest.raises(SystemExit, match="'5:10'"):
        parse_schedule("2:3,5:10")
    with pytest.raises(SystemExit, match="N:STEPS"):
        parse_schedule("abc")


def test_shuffled_letter_rows_still_answer_with_the_letter_beside_the_value(rows):
    rng = np.random.default_rng(3)
    orders = set()
    for _ in range(100):
        ids, k = rows.row(rng, 4, shuffle=1.0)
        lines = rows.tok.decode(ids[1:-1], skip_special_tokens=False).split("\n")
        options = dict(line.split(". ", 1) for line in lines[:4])
        asked = lines[4].removeprefix("Which option says ").removesuffix("?")
        orders.add("".join(options))
        assert sorted(options) == list(LETTERS) and options[LETTERS[k]] == asked and ids[-1] == rows.answer_ids[k]
    assert len(orders) > 10


def test_bench_layout_rows_ask_first_and_list_the_options_in_letter_order():
    tok = load_tokenizer(str(TOKENIZER))
    rows = LookupRows(tok, length=128, layout="bench", chat=0.5)
    rng = np.random.default_rng(5)
    for chat in (False, True):
        for _ in range(30):
            ids, k = rows.bench_row(rng, 4, chat)
            text = rows.tok.decode(ids[1:-1], skip_special_tokens=False)
            lines = text.split("\n")
            first = next(i for i, line in enumerate(lines) if line.startswith("A. "))
            options = dict(line.split(". ", 1) for line in lines[first:first + 4])
            assert list(options) == list(LETTERS) and ids[-1] == rows.answer_ids[k]
            assert options[LETTERS[k]] in " ".join(lines[:first])  # the question states its answer
            assert ("ASSISTANT:" in text) == chat and text.rstrip().endswith("ASSISTANT:" if chat else ":")
    x, w, attn = rows.batch(np.random.default_rng(6), 0, 32, "answer")
    lengths = attn.sum(1)
    assert lengths.min() < 60 < lengths.max()  # bare and chat rows in one batch
    (px, pattn), answers = rows.micro_probe(4, 0, count=8)
    assert "ASSISTANT" not in rows.tok.decode(px[0][pattn[0] > 0].tolist(), skip_special_tokens=False)
    with pytest.raises(ValueError, match="layout"):
        LookupRows(tok, layout="chat")
