import pytest
import yaml
from conftest import tiny_raw_config

from emorl_ray.config import ConfigError, load_config, parse_config


def test_shipped_configs_parse(tmp_path):
    cfg = load_config("configs/default.yaml")
    assert cfg.objective_names == ["reflection", "empathy", "fluency"]
    assert cfg.objectives["fluency"].scorer.type == "perplexity"


def test_faithful_config_needs_the_user_pair_file():
    with pytest.raises(ConfigError) as e:
        load_config("configs/pair_t5_faithful.yaml")
    assert e.value.path == "data.path"


def test_faithful_config_with_a_pair_file(tmp_path):
    pair = tmp_path / "pair.csv"
    pair.write_text("prompt,hq1,hq2,mq1,lq1,lq2,lq3,lq4,lq5\na,b,c,d,e,f,g,h,i\n")
    raw = yaml.safe_load(open("configs/pair_t5_faithful.yaml"))
    raw["data"]["path"] = str(pair)
    raw["model"]["id"] = "google-t5/t5-base"
    scorer = raw["objectives"]["reflection"]["scorer"]
    assert scorer["train_if_missing"] is True and "model" not in scorer  # the job trains it first
    scorer["train_if_missing"] = False
    with pytest.raises(ConfigError, match="train_if_missing") as e:
        parse_config(raw)
    assert e.value.path == "objectives.reflection.scorer.model"
    scorer.update(train_if_missing=True, model="org/some-hub-model")
    with pytest.raises(ConfigError, match="where the trained scorer goes") as e:
        parse_config(raw)
    scorer["model"] = str(tmp_path / "not_trained_yet")  # trained there by the job
    cfg = parse_config(raw)
    assert cfg.faithful and cfg.training.sampling.top_k == 50 and cfg.search.parameterization == "cube"
    assert cfg.training.baseline == "mean" and cfg.training.loss_reduction == "sequence_sum"


def _bad(tiny_causal, tmp_path, mutate):
    raw = tiny_raw_config(tiny_causal, tmp_path)
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    return e.value


@pytest.mark.parametrize("mutate, path, words", [
    (lambda r: r["training"].update(batchsize=4), "training.batchsize", "unknown key"),
    (lambda r: r.update(typo_section={}), "typo_section", "unknown key"),
    (lambda r: r["training"].update(max_steps="ten"), "training.max_steps", "integer"),
    (lambda r: r["training"].update(lr=True), "training.lr", "number"),
    (lambda r: r["training"].update(kl_coef=-0.1), "training.kl_coef", ">= 0"),
    (lambda r: r["training"].update(weight_decay=-1.0), "training.weight_decay", ">= 0"),
    (lambda r: r["data"].update(source="file", path="/nonexistent/data.csv"), "data.path", "does not exist"),
    (lambda r: r["objectives"].update(empathy={}), "objectives.empathy.scorer", "needs a scorer"),
    (lambda r: r["objectives"].update(empathy=None), "objectives.empathy.scorer", "needs a scorer"),
    (lambda r: r["objectives"]["overlap"]["scorer"].update(type="magic"), "objectives.overlap.scorer.type", "one of"),
    (lambda r: r["model"].update(id="/nonexistent/model"), "model.id", "does not exist"),
    (lambda r: r["model"].update(id="pip:no-such-package-xyz"), "model.id", "not installed"),
    (lambda r: r["data"]["split"].__setitem__("train", 0.9) if "split" in r["data"] else
     r["data"].update(split={"train": 0.9, "val": 0.1, "test": 0.1}), "data.split", "sum to 1"),
    (lambda r: r["training"].update(k=1), "training.k", "k >= 2"),
    (lambda r: r["search"].update(levels=0), "search.levels", ">= 1"),
    (lambda r: r["search"].update(parameterization="sphere"), "search.parameterization", "one of"),
    (lambda r: r.update(objectives={"only": r["objectives"]["overlap"]}), "objectives", "at least two"),
    (lambda r: r["training"]["scaling"].update(gpus_per_worker=0.5), "training.scaling.gpus_per_worker", "use_gpu"),
    (lambda r: r["training"].update(sampling={"top_p": 0.0}),
     "training.sampling.top_p", "(0, 1]"),
    (lambda r: r.update(baselines={"methods": ["uniform", "mixture"]}), "baselines.methods[1]", "one of"),
    (lambda r: r.update(baselines={"methods": ["dynaopt", "dynaopt"]}), "baselines.methods", "repeat"),
    (lambda r: r.update(baselines={"dynaopt_gamma": 0.0}), "baselines.dynaopt_gamma", "(0, 1]"),
    (lambda r: r["objectives"]["overlap"].update(scorer={"type": "cross_encoder"}), "objectives.overlap.scorer.model",
     "sequence-classification"),
    (lambda r: r["objectives"]["overlap"].update(
        scorer={"type": "cross_encoder", "model": "org/x", "input": "response"}),
     "objectives.overlap.scorer.input", "pairs"),
    (lambda r: r["data"].update(order_file="/nonexistent.csv"), "data.order_file", "PAIR"),
    (lambda r: r["training"].update(storage_path="relative/dir"), "training.storage_path", "URI"),
    (lambda r: r["training"].update(precision="fp16"), "training.precision", "needs a GPU"),
    (lambda r: r["objectives"].update(uniform=r["objectives"]["overlap"]), "objectives.uniform", "baseline"),
    (lambda r: r["evaluation"].update(decodings=["beam"]), "evaluation.decodings", "greedy"),
    (lambda r: r["evaluation"].update(methods=["emorl", "emorl"]), "evaluation.methods", "repeats"),
    (lambda r: r["evaluation"].update(samples_per_prompt=0), "evaluation.samples_per_prompt", ">= 1"),
    (lambda r: r["training"].update(keep_checkpoints=0), "training.keep_checkpoints", ">= 1"),
    (lambda r: r["model"].update(decode_step="cuda_graph"), "model.decode_step", "one of"),
    (lambda r: r["model"].update(kind="seq2seq", decode_step="graph"), "model.decode_step", "decoder-only"),
    (lambda r: r["search"].update(evaluator_gpus=-0.25), "search.evaluator_gpus", ">= 0"),
    (lambda r: r.update(serving={"num_gpus": -1}), "serving.num_gpus", ">= 0"),
])
def test_bad_config_names_the_field(tiny_causal, tmp_path, mutate, path, words):
    err = _bad(tiny_causal, tmp_path, mutate)
    assert err.path == path, str(err)
    assert words in str(err)
    assert str(err).startswith(path)


def test_overrides_and_yaml_errors(tmp_path):
    cfg = load_config("configs/default.yaml", {"training.max_steps": 3, "name": "x"})
    assert cfg.training.max_steps == 3 and cfg.name == "x"
    # YAML 1.1 reads `--set training.lr=3e-4` as the string "3e-4": a number is meant.
    assert load_config("configs/default.yaml", {"training.lr": "3e-4"}).training.lr == 3e-4
    with pytest.raises(ConfigError, match="training.lr: must be a number, got '3e-4x'"):
        load_config("configs/default.yaml", {"training.lr": "3e-4x"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_dict(tiny_config):
    from emorl_ray.config import config_from_dict

    again = config_from_dict(tiny_config.to_dict())
    assert again == tiny_config


def test_faithful_changes_defaults_but_explicit_values_win(tiny_causal, tmp_path):
    raw = tiny_raw_config(tiny_causal, tmp_path)
    raw["faithful"] = True
    raw["training"]["baseline"] = "rloo"
    cfg = parse_config(raw)
    t = cfg.training
    assert (t.sampling.top_k, t.loss_reduction, t.baseline) == (50, "sequence_sum", "rloo")
    assert cfg.baselines.full_finetune and cfg.search.parameterization == "cube" and not cfg.search.cache
    assert t.max_steps == 4  # set in the file
    plain = parse_config(tiny_raw_config(tiny_causal, tmp_path))
    assert plain.training.sampling.top_k == 0 and plain.training.loss_reduction == "token_mean"
    # Workers rebuild the config from to_dict(): the values must survive unchanged.
    from emorl_ray.config import config_from_dict

    assert config_from_dict(cfg.to_dict()) == cfg


def test_pair_smollm2_config_takes_the_data_paths(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config("configs/pair_smollm2.yaml")
    assert e.value.path == "data.path"
    assert "--set data.path=" in str(e.value)
    data = tmp_path / "pair.csv"
    data.write_text("a,b,c,d,e,f,g,h,i,j\n")
    with pytest.raises(ConfigError) as e:
        load_config("configs/pair_smollm2.yaml", {"data.path": str(data)})
    assert e.value.path == "evaluation.generalization.path"
    cfg = load_config("configs/pair_smollm2.yaml",
                      {"data.path": str(data), "evaluation.generalization.path": str(data)})
    assert cfg.objectives["reflection"].scorer.train_if_missing and cfg.objectives["reflection"].scorer.model is None
    assert cfg.search.compare_aggregations == ["logit", "parameter"] and cfg.baselines.methods == ["uniform", "dynaopt"]
    assert cfg.evaluation.generalization.source == "annomi"
