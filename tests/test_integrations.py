"""The framework callbacks (a real Lightning fit and a real ``transformers.Trainer`` run on CPU,
tiny models: the slow tier) and ``gradlab export --to tensorboard``, read back with
TensorBoard's own event reader.

Each callback's run reads back with ``gradlab.load``; its step-0 ``grad_weight_norm`` equals
autograd's on a copy of the model at initialisation, and the metrics the framework logged are
there, under the splits the callback's docstring gives."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradlab
from gradlab.config import make_config
from gradlab.integrations.common import scalars, split_metric
from gradlab.runner import execute
from gradlab.store import StoreError

from .helpers import invoke


def step0(results, layer: str) -> float:
    grads = results.grads
    return grads[(grads["step"] == 0) & (grads["layer_name"] == layer)][
        "grad_weight_norm"].item()


def logged(results, split: str, metric: str) -> list[tuple[int, float]]:
    m = results.metrics
    rows = m[(m["split"] == split) & (m["metric"] == metric)]
    return list(zip(rows["step"].tolist(), rows["value"].tolist()))


# -- Lightning ----------------------------------------------------------------------------------


def lightning_module(log: bool):
    import lightning as L

    class Classifier(L.LightningModule):
        """Linear layers built in a loop from ``widths``, tanh between them."""

        def __init__(self, widths=(6, 16, 3), lr=0.1):
            super().__init__()
            self.save_hyperparameters()
            layers = []
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
            self.net = nn.Sequential(*layers)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            loss = F.cross_entropy(logits, y)
            if log:
                self.log("train_loss", loss)
                self.log("acc", (logits.argmax(1) == y).float().mean(), on_step=True,
                         on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            if log:
                self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    return Classifier


def lightning_fit(module, callback, loader, val_loader=None, epochs=2):
    import lightning as L

    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, loader, val_loader)


def toy_data(n=32):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def shuffled(data):
    return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_a_lightning_fit_is_one_run_with_its_gradients_and_metrics(tmp_path):
    from gradlab.integrations.lightning import GradlabCallback

    data = toy_data()
    torch.manual_seed(0)
    module = lightning_module(log=True)()
    reference = copy.deepcopy(module)
    callback = GradlabCallback(tmp_path, log_every=1, name="lit", config={"note": "mine"})
    lightning_fit(module, callback, shuffled(data), DataLoader(data, batch_size=16))
    assert callback.path == tmp_path / "runs" / "lit"

    results = gradlab.load(tmp_path)
    run = results.runs.iloc[0]
    # (a user's key named as a setting of gradlab's MLPs, widths, is kept as config_widths)
    assert (run["status"], run["model"], run["config_widths"], run["lr"], run["note"]) == (
        "complete", "Classifier", "6,16,3", 0.1, "mine")
    assert sorted(results.grads["step"].unique()) == list(range(8))  # 2 epochs of 4 batches
    assert sorted(results.grads["epoch"].unique()) == [1, 2]  # flushed at each epoch end
    x, y = next(iter(shuffled(data)))  # the first batch of the fit
    loss = F.cross_entropy(reference(x), y)
    loss.backward()
    for i, layer in ((0, "net.0"), (2, "net.2")):
        expected = reference.net[i].weight.grad.norm().item()
        assert step0(results, layer) == pytest.approx(expected, rel=1e-5)

    train_loss = logged(results, "train", "loss")  # from "train_loss", once per step
    assert [s for s, _ in train_loss] == list(range(8))
    assert train_loss[0][1] == pytest.approx(loss.item(), rel=1e-6)
    assert [s for s, _ in logged(results, "train", "acc_step")] == list(range(8))
    assert [s for s, _ in logged(results, "train", "acc_epoch")] == [3, 7]
    assert [s for s, _ in logged(results, "val", "loss")] == [3, 7]  # each epoch's validation
    assert set(results.metrics["split"]) == {"train", "val"}  # (not the sanity check's)
    grads = results.grads[results.grads["layer_name"] == "net.0"]
    assert grads["loss"].tolist() == pytest.approx([v for _, v in train_loss])


@pytest.mark.slow
def test_lightning_logs_the_returned_loss_and_refuses_a_taken_name_before_the_fit(tmp_path):
    from gradlab.integrations.lightning import GradlabCallback

    data = toy_data(16)
    torch.manual_seed(0)
    module = lightning_module(log=False)()
    callback = GradlabCallback(tmp_path, log_every=2, name="quiet")
    lightning_fit(module, callback, shuffled(data), epochs=1)
    results = gradlab.load(tmp_path)
    assert [s for s, _ in logged(results, "train", "loss")] == [0, 1]  # training_step's loss
    assert sorted(results.grads["step"].unique()) == [0]  # log_every=2 of 2 steps
    assert results.grads["loss"].notna().all()

    again = lightning_module(log=False)()
    before = copy.deepcopy(again.state_dict())
    with pytest.raises(StoreError, match="'quiet' is already in .*overwrite=True"):
        lightning_fit(again, GradlabCallback(tmp_path, log_every=2, name="quiet"),
                      shuffled(data), epochs=1)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in before.items())  # no step


# -- Hugging Face Trainer -------------------------------------------------------------------------


def tiny_bert(output_dir, n=16, length=10):
    """A 2-layer BERT classifier (hidden size 32) built from its config (nothing downloaded),
    without dropout; ``n`` examples as tensors and as the Trainer's dataset; and training
    arguments of 3 epochs of one batch (every example: so each step's gradient does not depend
    on their order), logging every step and evaluating at each epoch end, on the CPU."""
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=16,
                        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (n, length), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    examples = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
                for i in range(n)]
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=n,
                             per_device_eval_batch_size=n, num_train_epochs=3, logging_steps=1,
                             eval_strategy="epoch", save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, learning_rate=1e-3)
    return model, (ids, mask, labels), examples, args


@pytest.mark.slow
def test_a_transformers_trainer_run_is_one_run_with_its_gradients_and_metrics(tmp_path):
    from transformers import Trainer

    from gradlab.integrations.transformers import GradlabCallback

    model, (ids, mask, labels), examples, args = tiny_bert(tmp_path / "hf")
    reference = copy.deepcopy(model)
    callback = GradlabCallback(tmp_path / "res", log_every=1, name="bert")
    Trainer(model=model, args=args, train_dataset=examples, eval_dataset=examples,
            callbacks=[callback]).train()

    results = gradlab.load(tmp_path / "res")
    run = results.runs.iloc[0]
    assert (run["model"], run["model_type"], run["learning_rate"], run["lr_scheduler_type"]) == (
        "BertForSequenceClassification", "bert", 1e-3, "linear")
    assert sorted(results.grads["step"].unique()) == [0, 1, 2]
    assert sorted(results.grads["epoch"].unique()) == [1, 2, 3]
    out = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    for layer in ("classifier", "bert.encoder.layer.0.attention.self.query"):
        expected = reference.get_submodule(layer).weight.grad.norm().item()
        assert step0(results, layer) == pytest.approx(expected, rel=1e-4)

    train_loss = logged(results, "train", "loss")
    assert [s for s, _ in train_loss] == [0, 1, 2]  # logging_steps=1
    assert train_loss[0][1] == pytest.approx(out.loss.item(), rel=1e-4)
    assert [s for s, _ in logged(results, "eval", "loss")] == [0, 1, 2]  # each epoch's eval
    assert [s for s, _ in logged(results, "train", "train_loss")] == [2]  # the run's summary
    assert {"grad_norm", "learning_rate"} <= set(results.metrics["metric"])
    assert "epoch" not in set(results.metrics["metric"])
    grads = results.grads[results.grads["layer_name"] == "classifier"]
    assert grads["loss"].tolist() == pytest.approx([v for _, v in train_loss])


# -- README -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_readme_blocks_run(tmp_path, monkeypatch):
    """The code blocks of README.md's "Your metrics, Lightning, Hugging Face, TensorBoard", with
    the names they leave to the reader (the model, its data, the Trainer's arguments) given."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Your metrics, Lightning, Hugging Face, TensorBoard", 1)[1]
    section = section.split("\n## ", 1)[0]
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    shell = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(python) == 3 and len(shell) == 1
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    hf_model, _, examples, args = tiny_bert(tmp_path / "hf")
    scope = {"gradlab": gradlab, "F": F, "model": model, "loader": shuffled(toy_data()),
             "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
             "evaluate": lambda model: 0.5, "module": lightning_module(log=True)(),
             "train_loader": shuffled(toy_data()), "val_loader": DataLoader(toy_data()),
             "hf_model": hf_model, "args": args, "train_set": examples, "eval_set": examples}
    for code in python:
        exec(compile(code, "README.md", "exec"), scope)
    for folder, split in (("mine", "test"), ("lit", "val"), ("hf", "eval")):
        results = gradlab.load(tmp_path / "results" / folder)
        assert len(results.runs) == 1 and len(results.grads)
        assert {"train", split} <= set(results.metrics["split"]), folder
    commands = [shlex.split(line) for line in shell[0].splitlines()]
    assert [c[:2] for c in commands] == [["gradlab", "export"], ["tensorboard", "--logdir"]]
    r = invoke(*commands[0][1:])
    assert r.exit_code == 0, r.output
    events = read_events(tmp_path / "results/tb/logged")
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert [e.step for e in events.Scalars("grad_weight_norm/0")] == [0]


# -- what the callbacks share, and their extras --------------------------------------------------


def test_metric_names_give_the_split_and_configs_keep_scalars():
    splits = ("train", "val", "test")
    assert split_metric("val_loss", splits, "train") == ("val", "loss")
    assert split_metric("test/acc_epoch", splits, "train") == ("test", "acc_epoch")
    assert split_metric("loss", splits, "val") == ("val", "loss")
    assert split_metric("lr-SGD", splits, "train") == ("train", "lr-SGD")
    assert split_metric("val_", splits, "train") == ("train", "val_")
    assert scalars({"widths": [32, 32], "lr": 0.1, "opt": object(), "n": None,
                    "nested": {"a": 1}}) == {"widths": "32,32", "lr": 0.1, "n": None}


def test_gradlab_imports_no_framework_and_a_missing_one_is_named(monkeypatch):
    code = ("import sys, gradlab, gradlab.cli, gradlab.export, gradlab.integrations.common\n"
            "heavy = {'lightning', 'pytorch_lightning', 'transformers', 'tensorboard'}\n"
            "print(sorted(heavy & set(sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # (an import of it fails)
    from gradlab.errors import GradlabError

    for module, extra in (("lightning", "lightning"), ("transformers", "transformers")):
        monkeypatch.delitem(sys.modules, f"gradlab.integrations.{module}", raising=False)
        with pytest.raises(GradlabError, match=rf"needs the {extra} package: pip install "
                                               rf"'gradlab\[{extra}\]'") as info:
            __import__(f"gradlab.integrations.{module}")
        assert isinstance(info.value, ImportError) and "\n" not in str(info.value)


# -- TensorBoard export ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_results(fake_mnist, tmp_path_factory):
    """A results folder with a gradlab run that records distributions and a watched run with
    logged metrics."""
    out = tmp_path_factory.mktemp("export") / "res"
    execute(make_config(depth=2, width=8, epochs=1, train_size=128, batch_size=32, dist_every=2),
            out, data_dir=str(fake_mnist), device="cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = toy_data(16)
    with gradlab.watch(model, opt, log_every=1) as rec:
        for x, y in DataLoader(data, batch_size=4, shuffle=True,
                               generator=torch.Generator().manual_seed(0)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            rec.log(loss=loss.item())
        rec.log(split="test", accuracy=0.5)
    rec.save(out, name="watched", config={"model": "tanh-mlp"})
    return out


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_export_to_tensorboard_reads_back_with_tensorboards_reader(mixed_results, tmp_path):
    out = tmp_path / "tb"
    r = invoke("export", mixed_results, "--to", "tensorboard", "--out", out)
    assert r.exit_code == 0, r.output
    results = gradlab.load(mixed_results)
    trained = results.runs.loc[results.runs["model"].isna(), "run_id"].item()
    assert r.output.split() == sorted(str(out / run) for run in (trained, "watched"))

    events = read_events(out / trained)
    grads = results.grads[results.grads["run_id"] == trained]
    tags = set(events.Tags()["scalars"])
    for column in ("grad_weight_norm", "grad_output_norm", "update_ratio", "act_grad_mean"):
        for layer, rows in grads.groupby("layer_name"):
            rows = rows[rows[column].notna()]
            if rows.empty:  # e.g. f' of the output layer: no tag
                assert f"{column}/{layer}" not in tags
                continue
            read = events.Scalars(f"{column}/{layer}")
            assert [e.step for e in read] == rows["step"].tolist()
            np.testing.assert_allclose([e.value for e in read], rows[column], rtol=1e-6)
    assert [e.step for e in events.Scalars("loss")] == sorted(grads["step"].unique())
    epochs = results.epochs[results.epochs["run_id"] == trained]
    test = epochs[epochs["split"] == "test"]
    read = events.Scalars("test/accuracy")
    assert [(e.step, e.value) for e in read] == pytest.approx(
        list(zip(test["step"], test["accuracy"])))

    dists = results.dists[results.dists["run_id"] == trained]
    hist_tags = set(events.Tags()["histograms"])
    assert hist_tags == {f"{q}/{n}" for q, n in zip(dists["quantity"], dists["layer_name"])}
    histograms = events.Histograms("grad_weight/fc0")
    assert [h.step for h in histograms] == sorted(dists["step"].unique())
    first = dists[(dists["step"] == 0) & (dists["layer_name"] == "fc0")
                  & (dists["quantity"] == "grad_weight")]
    bins = first[first["stat"] == "count"]
    h = histograms[0].histogram_value
    assert h.bucket == bins["value"].tolist() and h.bucket_limit == bins["bin_hi"].tolist()
    assert (h.min, h.max, h.num) == (bins["bin_lo"].min(), bins["bin_hi"].max(),
                                     bins["value"].sum())
    mean = first.loc[first["stat"] == "mean", "value"].item()
    assert h.sum / h.num == pytest.approx(mean)

    watched = read_events(out / "watched")
    metrics = results.metrics
    train = metrics[(metrics["split"] == "train") & (metrics["metric"] == "loss")]
    read = watched.Scalars("train/loss")
    assert [e.step for e in read] == train["step"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose([e.value for e in read], train["value"], rtol=1e-6)
    assert [(e.step, e.value) for e in watched.Scalars("test/accuracy")] == [(3, 0.5)]
    assert "grad_weight_norm/0" in watched.Tags()["scalars"]  # nn.Sequential's names
    assert watched.Tags()["histograms"] == []


def test_export_refuses_in_one_line_and_writes_nothing(mixed_results, tmp_path, monkeypatch):
    out = tmp_path / "tb"
    assert invoke("export", mixed_results, "--to", "tensorboard", "--out", out).exit_code == 0
    written = sorted(out.rglob("*"))
    r = invoke("export", mixed_results, "--to", "tensorboard", "--out", out)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "already holds event files: give another --out, or --overwrite" in r.output
    assert sorted(out.rglob("*")) == written
    r = invoke("export", mixed_results, "--to", "tensorboard", "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert all(len(list(f.glob("events.out.tfevents.*"))) == 1 for f in out.iterdir())

    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    for argv, needle in (
            ((empty,), "no finished runs in"),
            ((tmp_path / "absent",), "does not exist"),
            ((mixed_results, "--to", "csv"), "'csv' is not 'tensorboard'")):
        args = ["--to", "tensorboard"] if "--to" not in argv else []
        r = invoke("export", *argv, *args, "--out", tmp_path / "new")
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
        assert needle in r.output
    assert not (tmp_path / "new").exists()

    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)
    r = invoke("export", mixed_results, "--to", "tensorboard", "--out", tmp_path / "new")
    assert r.exit_code == 2 and r.output == (
        "Error: gradlab export --to tensorboard needs the tensorboard package: "
        "pip install 'gradlab[tensorboard]'\n")
    assert not (tmp_path / "new").exists()
