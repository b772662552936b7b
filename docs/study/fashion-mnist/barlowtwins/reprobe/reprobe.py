"""Issue 27: probe a finished tvlars ssl run's encoder (its checkpoint.pt) with the linear probe under
both --probe-norm settings, and its kNN, as tvlars ssl measures them. Usage: reprobe.py RUN_DIR OUT.json [EPOCHS]"""
import json, sys, time
from pathlib import Path
import torch, yaml
torch.set_num_threads(1)
from tvlars.harness.data.datasets import load_idx_dataset, load_digits


def load(name):
    return load_digits() if name == "digits" else load_idx_dataset(name)
from tvlars.harness.models import build_model
from tvlars.harness.ssl import barlow
from tvlars.harness.ssl.evaluate import extract_features, knn_accuracy, linear_probe

run = Path(sys.argv[1])
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 100
cfg = yaml.safe_load((run / "config.yaml").read_text())
d = load(cfg["dataset"])
from tvlars.harness.runtime import seed_everything
seed_everything(cfg["seed"])  # as tvlars ssl builds it: an --epochs 0 run has no checkpoint, its encoder is this
classifier = build_model(cfg["model"], d.num_classes, d.in_channels, d.image_size, stem=cfg.get("stem"), init=cfg["init"])
net = barlow.BarlowTwins(classifier.encoder, classifier.feature_dim, barlow.parse_projector(cfg["projector"]), cfg["lambd"])
if (run / "checkpoint.pt").exists():
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    net.load_state_dict(state["model"])
else:
    state = {"epoch": 0}
out = {"run": run.name, "checkpoint_epoch": int(state["epoch"]), "probe_epochs": epochs}
kw = dict(mean=d.mean, std=d.std, device="cpu", batch_size=1024)
train = extract_features(net.encoder, (d.train_images, d.train_labels), **kw)
test = extract_features(net.encoder, (d.test_images, d.test_labels), **kw)
out["feature_rms"] = float(train[0].pow(2).mean().sqrt())
for key, k in (("knn_acc", 200), ("knn20_acc", 20)):
    out[key] = knn_accuracy(*train, *test, k=k, temperature=0.1, num_classes=10)
print(out, flush=True)
for norm in ("bn", "none"):
    t = time.time()
    # the features once, as model-ready floats through an identity: the probe's own extraction, done once
    r = linear_probe(torch.nn.Identity(), train, test, num_classes=10,
                     epochs=epochs, batch_size=cfg["probe_batch_size"], lr=cfg["probe_lr"],
                     weight_decay=cfg["probe_weight_decay"], seed=cfg["seed"], device="cpu", norm=norm)
    out[f"probe_{norm}"], out[f"probe_{norm}_best"] = r["top1"], r["best_top1"]
    out[f"probe_{norm}_loss"] = [round(h["train_loss"], 4) for h in r["history"][:3]] + [round(r["history"][-1]["train_loss"], 4)]
    print(norm, r["top1"], r["best_top1"], out[f"probe_{norm}_loss"], f"{time.time() - t:.0f} s", flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
