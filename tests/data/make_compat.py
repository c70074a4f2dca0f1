"""Writes tests/data/compat_*: checkpoints and outputs of the code before fastfcn.config.ModelConfig
(commit cdf0531), which tests/test_config.py loads with the current code.

    .venv/bin/python tests/data/make_compat.py      # at commit cdf0531, from the repository root; seeded

(fastfcn.train.preprocess, which it imports, became the runtime Preprocessor in fastfcn.training.)

An FCN-AlexNet of width 0.03125 in fp16 (about 190 KB a file; at width 0.0625 the fc6 weights
alone make each file 520 KB), with every preprocessing key set away from its default.
"""

import json

import torch
from safetensors.torch import save_file

import fastfcn
from fastfcn.models import build
from fastfcn.train import preprocess

torch.manual_seed(13)
m = build("fcn-alexnet", 3, 0.03125).eval()
with torch.no_grad():
    for p in m.parameters():
        p.copy_(torch.randn_like(p) * 0.05)
m = m.half()
kw = dict(class_names=["background", "disc", "box"], palette=[[0, 0, 0], [200, 10, 10], [10, 200, 10]],
          color_order="RGB", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], input_scale=1.0,
          trained={"iterations": 30, "note": "compat"})
fastfcn.save(m, "tests/data/compat_alexnet_w03125.safetensors", **kw)
fastfcn.save(m, "tests/data/compat_alexnet_w03125.pt", **kw)
x = torch.randint(0, 256, (1, 37, 45, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
loaded = fastfcn.load("tests/data/compat_alexnet_w03125.safetensors")
demo = fastfcn.load("demo")
with torch.no_grad():
    logits = loaded(preprocess(x, loaded.config))
    demo_labels = demo(preprocess(x, demo.config)).argmax(1).to(torch.uint8)
configs = {"compat": loaded.config, "demo": demo.config}
save_file({"input": x, "logits": logits.contiguous(), "demo_labels": demo_labels.contiguous()},
          "tests/data/compat_expected.safetensors", metadata={"configs": json.dumps(configs)})
