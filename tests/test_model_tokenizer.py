"""Word-level tokenizer: deterministic ids, specials, unknown words, save/load."""
from model.tokenizer import BOS, PAD, SPECIAL_TOKENS, UNK, answer_id, build_tokenizer, encode_text, load_tokenizer


def test_ids_are_a_function_of_the_word_set():
    a = build_tokenizer(["red circle", "Blue", "square"])
    b = build_tokenizer(["square", "blue", "red", "circle", "red"])
    assert a.get_vocab() == b.get_vocab()
    vocab = a.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert a.pad_token == PAD and a.pad_token_id == 0 and a.bos_token_id == 2
    # words after the specials, sorted: digits and punctuation come before letters
    words = sorted(w for w in vocab if w not in SPECIAL_TOKENS)
    assert [vocab[w] for w in words] == list(range(4, 4 + len(words)))
    assert {"yes", "no", "1", ","} <= set(vocab)


def test_lowercase_punctuation_and_unknown_words():
    tok = build_tokenizer(["put", "the", "red", "circle", "image"])
    ids = tok("Put the RED circle, from image 2 zebra", add_special_tokens=False)["input_ids"]
    v = tok.get_vocab()
    assert ids == [v["put"], v["the"], v["red"], v["circle"], v[","], v[UNK], v["image"], v["2"], v[UNK]]


def test_encode_text_prepends_bos_and_truncates():
    tok = build_tokenizer(["a", "b"])
    v = tok.get_vocab()
    assert encode_text(tok, "a b a", max_len=10) == [v[BOS], v["a"], v["b"], v["a"]]
    assert encode_text(tok, "a b a", max_len=2) == [v[BOS], v["a"]]
    assert encode_text(tok, "", max_len=5) == [v[BOS]]
    assert answer_id(tok, "Yes") == v["yes"]


def test_default_vocabulary_is_the_instruction_writers(tmp_path):
    from data.instructions import VOCABULARY

    tok = build_tokenizer()
    assert set(VOCABULARY) <= set(tok.get_vocab())
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "put the striped red circle from image 1 on the beach"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert UNK not in tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
