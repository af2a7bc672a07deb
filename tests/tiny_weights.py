"""Tiny stage-2 weights shared by the test.py and infer.py tests, and the protocol written out independently."""
import cv2
import numpy as np
import torch
from PIL import Image

from models import OUR_FORMAT, build_stage2_model
from utils.config import load_config

INPUT_SIZE = 64


def tiny_model(head: str, seed: int) -> torch.nn.Module:
    """hrt_nano stage-2 model whose probabilities spread over [0, 1]: an untrained head outputs logits near 0, i.e.
    probabilities right at the 0.5 threshold, which would make every comparison a coin toss on rounding."""
    torch.manual_seed(seed)
    model = build_stage2_model("hrt_nano", head=head).eval()
    last = model.decoder.classifier[-1]
    with torch.no_grad():
        logits = model(torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE))
        scale = 4.0 / logits.std()
        last.weight.mul_(scale)
        last.bias.copy_((last.bias - logits.mean()) * scale)
    return model


def reference_probability(model, path) -> np.ndarray:
    """The protocol written out independently: PIL RGB read, cv2 bilinear squash-resize, /255, sigmoid, x255
    bilinear resize to the original size, back to [0, 1]."""
    image = np.asarray(Image.open(path).convert("RGB"))
    height, width = image.shape[:2]
    resized = cv2.resize(image, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
    batch = torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        prob = torch.sigmoid(model(batch))[0, 0].numpy()
    return cv2.resize(prob * 255, (width, height), interpolation=cv2.INTER_LINEAR) / 255


def save_tiny_weights(folder, ours_name: str, ours_seed: int, official_name: str, official_seed: int) -> dict:
    """Our checkpoint format (catnet head) and an official-style bare state_dict (casiav2 head) in `folder`:
    {"ours": (path, model), "official": (path, model)}."""
    ours = tiny_model("catnet", seed=ours_seed)
    config = load_config(None, ["STAGE", "2", "MODEL.BACKBONE", "hrt_nano"])
    torch.save({"format": OUR_FORMAT, "stage": 2, "model": ours.state_dict(), "config": config.dump()},
               folder / ours_name)
    official = tiny_model("casiav2", seed=official_seed)
    torch.save(official.state_dict(), folder / official_name)
    return {"ours": (folder / ours_name, ours), "official": (folder / official_name, official)}
