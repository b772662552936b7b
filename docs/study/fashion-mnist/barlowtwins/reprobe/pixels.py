"""Issue 27: the raw-pixel references of the Barlow Twins study, every one measured as the encoders are:
the linear probe (100 epochs, both --probe-norm settings) and the weighted kNN (k=200, k=20, T=0.1)
on the 784 normalised pixels of Fashion-MNIST."""
import json, sys, time
import torch
torch.set_num_threads(1)
from tvlars.harness.data.datasets import load_idx_dataset as load
from tvlars.harness.ssl.evaluate import extract_features, knn_accuracy, linear_probe

d = load("fashion-mnist")
enc = torch.nn.Flatten()
out = {}
kw = dict(mean=d.mean, std=d.std, device="cpu")
trf, trl = extract_features(enc, (d.train_images, d.train_labels), **kw)
tef, tel = extract_features(enc, (d.test_images, d.test_labels), **kw)
for key, k in (("knn_acc", 200), ("knn20_acc", 20)):
    out[key] = knn_accuracy(trf, trl, tef, tel, k=k, temperature=0.1, num_classes=10)
    print(key, out[key], flush=True)
for norm in ("bn", "none"):
    t = time.time()
    r = linear_probe(enc, (d.train_images, d.train_labels), (d.test_images, d.test_labels), num_classes=10,
                     epochs=100, norm=norm, **kw)
    out[f"probe_{norm}"] = r["top1"]
    out[f"probe_{norm}_best"] = r["best_top1"]
    print(norm, r["top1"], r["best_top1"], f"{time.time() - t:.0f} s", flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
