"""vLLM's scoring APIs: cross-encoders (Bert/Roberta/XLMRobertaForSequenceClassification) score
text pairs as transformers does, each pair as the tokenizer encodes pairs (BERT's second text of
token type 1), through LLM.score, LLM.classify, POST /score, /rerank and /classify; an embedding
model's score is the cosine similarity of the two texts' embeddings; 1-to-N and N-to-N pairing,
rerank order and top_n; bad input refused naming the field, and each API refused by name on a
model that cannot serve it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from pagoda import LLM, PoolingParams
from pagoda.attention import get_attention_backend
from pagoda.config.engine_config import EngineConfig
from pagoda.config.resolve import resolve_config
from pagoda.entrypoints.openai.server import build_app
from pagoda.entrypoints.openai.serving_engine import ServerConfig
from pagoda.loader.model_loader import build_model
from pagoda.loader.model_resolver import resolve_model
from pagoda.models import model_class
from tests.serving import MODEL, http_client, openai_error, serving
from tests.test_embed_bert import save_tiny_encoder
from tests.test_embeddings import hf_embeddings
from tests.test_server_endpoints import HeldEngine

MAX_POSITIONS = 64
QUERY = "what is a cat?"
DOCUMENTS = ["a cat is a small animal.", "the stock market fell 3 points", "cats purr", "x"]

# name -> (config class, architecture, extra config)
CROSS_ENCODERS = {
    "bert": (transformers.BertConfig, "BertForSequenceClassification", dict(
        max_position_embeddings=MAX_POSITIONS, type_vocab_size=2,
    )),
    "roberta": (transformers.RobertaConfig, "RobertaForSequenceClassification", dict(
        max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1, pad_token_id=1,
    )),
    "xlm-roberta": (transformers.XLMRobertaConfig, "XLMRobertaForSequenceClassification", dict(
        max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1, pad_token_id=1, hidden_act="gelu_new",
    )),
}


def save_bert_tokenizer(path: Path) -> int:
    """A WordPiece tokenizer whose words split into characters ([CLS] a [SEP] b [SEP] for pairs,
    with token types); returns its vocabulary's size."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,?!", *chars, *(f"##{c}" for c in chars)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    return len(vocab)


def save_roberta_tokenizer(path: Path) -> int:
    """A byte-level tokenizer with RoBERTa's specials and pairs (<s> a </s></s> b </s>, no token
    types, as XLM-R's); returns its vocabulary's size."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        sep_token="</s>", cls_token="<s>", model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(path)
    return len(vocab)


def save_cross_encoder(name: str, directory: Path, id2label: dict[int, str] | None = None) -> Path:
    """A random cross-encoder with its tokenizer (one label unless id2label says otherwise)."""
    path = directory / name
    vocab_size = save_bert_tokenizer(path) if name == "bert" else save_roberta_tokenizer(path)
    config_cls, arch, extra = CROSS_ENCODERS[name]
    config = config_cls(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        initializer_range=0.2, architectures=[arch], id2label=id2label or {0: "LABEL_0"}, **extra,
    )
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).float().eval().save_pretrained(path)
    return path


def hf_logits(path: Path, text_1: str, text_2: str | None = None, **tokenizer_kwargs) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**tokenizer(text_1, text_2, return_tensors="pt", **tokenizer_kwargs)).logits[0]


def hf_score(path: Path, text_1: str, text_2: str, **tokenizer_kwargs) -> float:
    return torch.sigmoid(hf_logits(path, text_1, text_2, **tokenizer_kwargs))[0].item()


@pytest.mark.parametrize("name", sorted(CROSS_ENCODERS))
def test_llm_score_cross_encoder_matches_transformers(tmp_path: Path, name: str) -> None:
    path = save_cross_encoder(name, tmp_path)
    llm = LLM(str(path), max_num_seqs=3)
    tokenizer = llm.get_tokenizer()
    one_to_n = llm.score(QUERY, DOCUMENTS, use_tqdm=False)
    n_to_n = llm.score(DOCUMENTS, DOCUMENTS[::-1], use_tqdm=False)
    for outputs, pairs in (
        (one_to_n, [(QUERY, d) for d in DOCUMENTS]), (n_to_n, list(zip(DOCUMENTS, DOCUMENTS[::-1]))),
    ):
        assert len(outputs) == len(pairs)
        for output, (text_1, text_2) in zip(outputs, pairs):
            assert output.prompt_token_ids == tokenizer(text_1, text_2)["input_ids"]
            assert output.outputs.score == pytest.approx(hf_score(path, text_1, text_2), abs=1e-4)
    # Cut as the tokenizer cuts pairs: the longer text first, the specials kept.
    (cut,) = llm.score(QUERY, DOCUMENTS[0], truncate_prompt_tokens=12, use_tqdm=False)
    assert len(cut.prompt_token_ids) == 12
    want = hf_score(path, QUERY, DOCUMENTS[0], truncation=True, max_length=12)
    assert cut.outputs.score == pytest.approx(want, abs=1e-4)


def test_bert_pairs_need_their_token_types(tmp_path: Path) -> None:
    """The check above has teeth: with every token of type 0, BERT's scores would differ."""
    path = save_cross_encoder("bert", tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    encoded = tokenizer(QUERY, DOCUMENTS[0], return_tensors="pt")
    assert encoded["token_type_ids"].sum() > 0
    with torch.no_grad():
        typeless = torch.sigmoid(model(encoded["input_ids"]).logits)[0, 0].item()
    (output,) = LLM(str(path)).score(QUERY, DOCUMENTS[0], use_tqdm=False)
    assert abs(output.outputs.score - typeless) > 1e-3
    assert output.outputs.score == pytest.approx(hf_score(path, QUERY, DOCUMENTS[0]), abs=1e-4)


def test_llm_classify_gives_softmax_over_labels(tmp_path: Path) -> None:
    path = save_cross_encoder("bert", tmp_path, {0: "negative", 1: "neutral", 2: "positive"})
    llm = LLM(str(path), task="classify", max_num_seqs=2)  # vLLM's older spelling of runner="pooling"
    texts = ["good movie", "bad.", "it was ok i guess"]
    outputs = llm.classify(texts, use_tqdm=False)
    for output, text in zip(outputs, texts):
        want = torch.softmax(hf_logits(path, text), dim=0)
        torch.testing.assert_close(torch.tensor(output.outputs.probs), want, atol=1e-5, rtol=0)
        assert output.outputs.num_classes == 3
    # A score is one label's probability; a classifier gives no embeddings.
    with pytest.raises(ValueError, match="has 3 labels"):
        llm.score("a", "b", use_tqdm=False)
    with pytest.raises(ValueError, match="gives no embeddings"):
        llm.embed("a", use_tqdm=False)


def test_llm_use_activation_false_gives_raw_logits(tmp_path: Path) -> None:
    """vLLM's PoolingParams(use_activation=False): a cross-encoder's score is its logit (whose
    sigmoid is the default score), a classifier's probs its labels' logits."""
    raw = PoolingParams(use_activation=False)
    path = save_cross_encoder("bert", tmp_path / "one")
    llm = LLM(str(path), max_num_seqs=3)
    scores = [o.outputs.score for o in llm.score(QUERY, DOCUMENTS, use_tqdm=False)]
    logits = [o.outputs.score for o in llm.score(QUERY, DOCUMENTS, use_tqdm=False, pooling_params=raw)]
    assert logits == pytest.approx([hf_logits(path, QUERY, d)[0].item() for d in DOCUMENTS], abs=1e-4)
    assert scores == pytest.approx(torch.sigmoid(torch.tensor(logits)).tolist(), abs=1e-6)
    assert any(not 0 < logit < 1 for logit in logits)  # the test has teeth: these are no probabilities
    on = llm.score(QUERY, DOCUMENTS, use_tqdm=False, pooling_params=PoolingParams(use_activation=True))
    assert [o.outputs.score for o in on] == pytest.approx(scores, abs=1e-6)
    (one,) = llm.classify("good movie", use_tqdm=False, pooling_params=raw)
    assert one.outputs.probs == pytest.approx(hf_logits(path, "good movie").tolist(), abs=1e-4)
    path = save_cross_encoder("bert", tmp_path / "three", {0: "negative", 1: "neutral", 2: "positive"})
    (three,) = LLM(str(path)).classify("good movie", use_tqdm=False, pooling_params=raw)
    logits_3 = hf_logits(path, "good movie")
    assert three.outputs.probs == pytest.approx(logits_3.tolist(), abs=1e-4)
    assert abs(sum(three.outputs.probs) - 1) > 1e-3


def test_llm_score_embedding_model_is_cosine_similarity(tmp_path: Path) -> None:
    path = save_tiny_encoder("bert", tmp_path, "MEAN", True)
    llm = LLM(str(path), skip_tokenizer_init=True, max_num_seqs=3)
    prompts = [[5, 6, 7], list(range(10, 40)), [9], [3, 4]]
    want = hf_embeddings(path, prompts, "MEAN", True)
    as_prompts = [{"prompt_token_ids": p} for p in prompts]
    one_to_n = llm.score(as_prompts[0], as_prompts[1:], use_tqdm=False)
    n_to_n = llm.score(as_prompts[:2], as_prompts[2:], use_tqdm=False)
    for output, (i, j) in zip(one_to_n + n_to_n, [(0, 1), (0, 2), (0, 3), (0, 2), (1, 3)]):
        cosine = torch.nn.functional.cosine_similarity(want[i], want[j], dim=0).item()
        assert output.outputs.score == pytest.approx(cosine, abs=1e-5)
        assert output.prompt_token_ids == prompts[i] + prompts[j]
    with pytest.raises(ValueError, match="^data_2 has 3 texts for the 2 of data_1"):
        llm.score(as_prompts[:2], as_prompts[1:], use_tqdm=False)
    with pytest.raises(ValueError, match=r"^data_1=\[\] is invalid"):
        llm.score([], as_prompts, use_tqdm=False)
    with pytest.raises(ValueError, match="is an embedding model: it gives no label probabilities"):
        llm.classify(as_prompts[0], use_tqdm=False)


def test_token_types_need_a_model_with_two(tmp_path: Path) -> None:
    path = save_cross_encoder("xlm-roberta", tmp_path)
    llm = LLM(str(path))
    with pytest.raises(ValueError, match="^token_type_ids=<...> is invalid: XLMRobertaForSequenceClassification"):
        llm.classify({"prompt_token_ids": [0, 5, 2], "token_type_ids": [0, 0, 1]}, use_tqdm=False)
    with pytest.raises(ValueError, match="^token_type_ids=<...> is invalid: they must be one per prompt token"):
        llm.classify({"prompt_token_ids": [0, 5, 2], "token_type_ids": [0, 1, 0]}, use_tqdm=False)


@pytest.mark.parametrize("name", sorted(CROSS_ENCODERS))
def test_dummy_weights_and_weight_bytes(tmp_path: Path, name: str) -> None:
    path = save_cross_encoder(name, tmp_path)
    args = EngineConfig(model=str(path), load_format="dummy", device="cpu")
    model_config = resolve_config(args, resolve_model(str(path))).model
    cpu = torch.device("cpu")
    model = build_model(model_config, device=cpu, backend=get_attention_backend(cpu))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model_class(model_config.spec.architecture).weight_bytes(model_config.spec, torch.float32) == param_bytes


# The server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cross_encoder_server(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("cross")
    path = save_cross_encoder("bert", directory, {0: "relevant"})
    # No --runner: auto picks pooling for an encoder.
    with serving([str(path), "--served-model-name", MODEL], directory / "server.log") as (_, base):
        yield path, base


def test_score_endpoint_matches_transformers(cross_encoder_server) -> None:
    path, base = cross_encoder_server
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with http_client(base) as http:
        one_to_n = http.post("/score", json={"model": MODEL, "text_1": QUERY, "text_2": DOCUMENTS})
        n_to_n = http.post("/v1/score", json={"model": MODEL, "text_1": DOCUMENTS[:2], "text_2": DOCUMENTS[2:]})
        single = http.post("/score", json={"text_1": QUERY, "text_2": DOCUMENTS[0]})
    for response, pairs in (
        (one_to_n, [(QUERY, d) for d in DOCUMENTS]), (n_to_n, list(zip(DOCUMENTS[:2], DOCUMENTS[2:]))),
        (single, [(QUERY, DOCUMENTS[0])]),
    ):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and body["model"] == MODEL and body["id"].startswith("score-")
        assert [d["index"] for d in body["data"]] == list(range(len(pairs)))
        assert {d["object"] for d in body["data"]} == {"score"}
        for data, (text_1, text_2) in zip(body["data"], pairs):
            assert data["score"] == pytest.approx(hf_score(path, text_1, text_2), abs=1e-4)
        tokens = sum(len(tokenizer(a, b)["input_ids"]) for a, b in pairs)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == tokens


def test_rerank_orders_documents_by_score(cross_encoder_server) -> None:
    path, base = cross_encoder_server
    want = [hf_score(path, QUERY, d) for d in DOCUMENTS]
    order = sorted(range(len(DOCUMENTS)), key=lambda i: want[i], reverse=True)
    with http_client(base) as http:
        for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
            response = http.post(route, json={"model": MODEL, "query": QUERY, "documents": DOCUMENTS})
            assert response.status_code == 200, response.text
            body = response.json()
            assert [r["index"] for r in body["results"]] == order
            for result in body["results"]:
                assert result["document"] == {"text": DOCUMENTS[result["index"]]}
                assert result["relevance_score"] == pytest.approx(want[result["index"]], abs=1e-4)
            assert body["usage"]["total_tokens"] > 0 and body["model"] == MODEL
        top = http.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": False})
        assert [r["index"] for r in top.json()["results"]] == order[:2]
        assert all("document" not in r for r in top.json()["results"])


def test_classify_endpoint_gives_label_probabilities(cross_encoder_server) -> None:
    path, base = cross_encoder_server
    texts = ["good movie", "bad."]
    with http_client(base) as http:
        response = http.post("/classify", json={"model": MODEL, "input": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == MODEL
    for data, text in zip(body["data"], texts):
        # One label: its probability is the sigmoid of its logit, as vLLM's.
        assert data["probs"] == pytest.approx([torch.sigmoid(hf_logits(path, text))[0].item()], abs=1e-4)
        assert data["label"] == "relevant" and data["num_classes"] == 1
    assert [d["index"] for d in body["data"]] == [0, 1]


def test_use_activation_false_gives_raw_logits(cross_encoder_server) -> None:
    """vLLM's `use_activation: false` on /score, /rerank and /classify: the cross-encoder's logit,
    whose sigmoid is the default score; true is the default."""
    path, base = cross_encoder_server
    logits = [hf_logits(path, QUERY, d)[0].item() for d in DOCUMENTS]
    assert any(not 0 < logit < 1 for logit in logits)  # no probabilities
    order = sorted(range(len(DOCUMENTS)), key=lambda i: logits[i], reverse=True)
    pairs = {"model": MODEL, "text_1": QUERY, "text_2": DOCUMENTS}
    with http_client(base) as http:
        default = http.post("/score", json=pairs).json()
        on = http.post("/v1/score", json={**pairs, "use_activation": True}).json()
        raw = http.post("/score", json={**pairs, "use_activation": False}).json()
        for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
            body = {"model": MODEL, "query": QUERY, "documents": DOCUMENTS, "use_activation": False}
            ranked = http.post(route, json=body).json()["results"]
            assert [r["index"] for r in ranked] == order
            assert [r["relevance_score"] for r in ranked] == pytest.approx([logits[i] for i in order], abs=1e-4)
        classify = http.post("/classify", json={"model": MODEL, "input": ["good movie"], "use_activation": False})
    raw_scores = [d["score"] for d in raw["data"]]
    assert raw_scores == pytest.approx(logits, abs=1e-4)
    # Separate requests: the same pairs' logits repeat within ~2e-6 (their steps' batches may differ).
    assert [d["score"] for d in default["data"]] == pytest.approx(
        torch.sigmoid(torch.tensor(raw_scores)).tolist(), abs=1e-5
    )
    assert [d["score"] for d in on["data"]] == pytest.approx([d["score"] for d in default["data"]], abs=1e-5)
    (data,) = classify.json()["data"]
    assert data["probs"] == pytest.approx(hf_logits(path, "good movie").tolist(), abs=1e-4)
    assert data["label"] == "relevant" and data["num_classes"] == 1


@pytest.mark.parametrize("route,body,param", [
    ("/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_2"),
    ("/score", {"text_1": [], "text_2": "a"}, "text_1"),
    ("/score", {"text_1": "a", "text_2": []}, "text_2"),
    ("/score", {"text_1": "a"}, "text_2"),
    ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 10**4}, "truncate_prompt_tokens"),
    ("/score", {"text_1": "a", "text_2": "b " * 100}, "text_2"),  # past max_model_len
    ("/rerank", {"query": "a", "documents": []}, "documents"),
    ("/rerank", {"documents": ["a"]}, "query"),
    ("/classify", {"input": []}, "input"),
    ("/score", {"text_1": "a", "text_2": "b", "use_activation": "maybe"}, "use_activation"),
    ("/v2/rerank", {"query": "a", "documents": ["b"], "use_activation": [False]}, "use_activation"),
    ("/classify", {"input": "a", "use_activation": {"on": False}}, "use_activation"),
    ("/v1/embeddings", {"input": "a"}, "model"),  # a cross-encoder gives no embeddings
])
def test_bad_score_requests_name_the_field(cross_encoder_server, route: str, body: dict, param: str) -> None:
    _, base = cross_encoder_server
    with http_client(base) as http:
        openai_error(http.post(route, json={"model": MODEL, **body}), 400, param)
        assert http.post("/score", json={"model": MODEL, "text_1": "a", "text_2": "b"}).status_code == 200


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("embed")
    vocab_size = save_bert_tokenizer(directory / "bert")
    path = save_tiny_encoder("bert", directory, "MEAN", True, vocab_size=vocab_size)
    with serving([str(path), "--served-model-name", MODEL], directory / "server.log") as (_, base):
        yield path, base


def test_embedding_model_scores_are_cosine_similarities(embedding_server) -> None:
    path, base = embedding_server
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = [QUERY, *DOCUMENTS]
    want = hf_embeddings(path, [tokenizer.encode(t) for t in texts], "MEAN", True)
    cosines = [torch.nn.functional.cosine_similarity(want[0], w, dim=0).item() for w in want[1:]]
    with http_client(base) as http:
        score = http.post("/score", json={"model": MODEL, "text_1": QUERY, "text_2": DOCUMENTS}).json()
        rerank = http.post("/rerank", json={"model": MODEL, "query": QUERY, "documents": DOCUMENTS, "top_n": 3}).json()
        pairwise = http.post("/score", json={"model": MODEL, "text_1": DOCUMENTS[:2], "text_2": DOCUMENTS[2:]}).json()
        # vLLM's use_activation leaves a cosine similarity as it is.
        raw = http.post("/score", json={"model": MODEL, "text_1": QUERY, "text_2": DOCUMENTS, "use_activation": False})
        classify = http.post("/classify", json={"model": MODEL, "input": "a"})
    assert [d["score"] for d in score["data"]] == pytest.approx(cosines, abs=1e-5)
    assert [d["score"] for d in raw.json()["data"]] == pytest.approx([d["score"] for d in score["data"]], abs=1e-6)
    order = sorted(range(len(DOCUMENTS)), key=lambda i: cosines[i], reverse=True)[:3]
    assert [r["index"] for r in rerank["results"]] == order
    assert [r["relevance_score"] for r in rerank["results"]] == pytest.approx([cosines[i] for i in order], abs=1e-5)
    for data, (i, j) in zip(pairwise["data"], [(1, 3), (2, 4)]):
        cosine = torch.nn.functional.cosine_similarity(want[i], want[j], dim=0).item()
        assert data["score"] == pytest.approx(cosine, abs=1e-5)
    assert "embedding model" in openai_error(classify, 400, "model")["message"]


@pytest.mark.parametrize("route,body", [
    ("/score", {"text_1": "a", "text_2": "b"}),
    ("/v1/rerank", {"query": "a", "documents": ["b"]}),
    ("/classify", {"input": "a"}),
])
def test_generating_server_refuses_scoring(route: str, body: dict) -> None:
    app = TestClient(build_app(HeldEngine(), ServerConfig([MODEL], 64, None, False)))
    assert "--runner pooling" in openai_error(app.post(route, json={"model": MODEL, **body}), 400, "model")["message"]
