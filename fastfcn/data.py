"""Datasets: PASCAL VOC segmentation on disk, and generated scenes for the demo and the tests.

Both yield ``(image, label)`` pairs: ``image`` is ``(H, W, 3)`` uint8 RGB, ``label``
is ``(H, W)`` uint8 class ids with 255 meaning "ignore" (VOC's void). For the two-headed nets
(SIFT Flow) the label is ``{head: label}``; for the two-input nets (NYUDv2 fusion) an item is
``(image, label, {modality: array})``: both readers give these forms.

``fastfcn data synth OUT [--arch ARCH]`` writes :class:`SyntheticScenes` in the VOC layout
(``write_voc``), with each head's labels and each second input where the readers look for a
real data set's, so the same readers serve real and generated data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .config import SIFTFLOW_GEOMETRIC
from .errors import InputError
from .imageio import IMAGE_SUFFIXES, read_image, read_second
from .names import DEFAULT_MAX_PIXELS
from .paths import StemIndex, match_file
from .viz import save_labels

IGNORE = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# Seed of the held-out synthetic split: `fastfcn eval --data synthetic`, the demo and the
# shipped model's test read it; `fastfcn train` refuses it as a training seed.
HELDOUT_SEED = 1_000_003
HELDOUT_SIZE = 96
HELDOUT_N = 500


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``(n, 3)`` uint8, class id -> RGB (bit-interleaved, as in VOCdevkit)."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


# --------------------------------------------------------------------------- VOC on disk


def _read_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise InputError(
                    f"label file {path} has mode {im.mode}; expected a palette (P) or grayscale (L) PNG "
                    "whose pixel values are class ids"
                )
            return np.array(im)  # palette indices are the class ids
    except FileNotFoundError:
        raise InputError(f"label file {path} is missing") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"label file {path} is corrupt or not a PNG ({e})") from None


def _read_text(path: Path, what: str) -> str:
    """A list file's text; InputError naming it when it is not UTF-8 (PowerShell's ``>`` writes
    UTF-16). utf-8-sig: Windows editors start a UTF-8 file with a byte-order mark, which would
    otherwise become part of the first name (a "missing" file whose printed name looks right)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8, "
                         "one name a line") from None


def split_ids(list_file: Path) -> list[str]:
    """The image ids of a split list (``ImageSets/Segmentation/<split>.txt``), blank lines skipped."""
    ids = []
    for line in _read_text(list_file, "split list").splitlines():
        # SBD-style lists may hold "/JPEGImages/x.jpg /SegmentationClassAug/x.png" pairs: the
        # id is the file's name less an image suffix; a bare id keeps any dots ("cam1.000").
        tok = line.split()
        if tok:
            name = Path(tok[0])
            ids.append(name.stem if name.suffix.lower() in IMAGE_SUFFIXES else name.name)
    return ids


def read_class_names(path: Path) -> tuple[str, ...]:
    """A ``class_names.txt``: one name per line, as ``write_voc`` writes it (a name may hold
    spaces: NYUDv2's "floor mat", "night stand"); blank lines and the ends of lines are
    dropped. A file of one line lists its names separated by white space."""
    lines = [ln.strip() for ln in _read_text(path, "class list").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise InputError(f"class list {path} is empty; expected the data set's class names, one a line")
    return tuple(lines[0].split() if len(lines) == 1 else lines)


class VOCSegmentation:
    """PASCAL VOC segmentation: ``root`` holds ``JPEGImages/``, ``SegmentationClass/`` and
    ``ImageSets/Segmentation/<split>.txt`` (e.g. ``VOCdevkit/VOC2012``; the devkit folder
    itself is also accepted).

    The SBD-augmented set in its usual converted form is read too: a list such as
    ``ImageSets/Segmentation/train_aug.txt`` whose labels live in ``SegmentationClassAug/``
    (grayscale or palette PNGs). A label is looked up in ``SegmentationClass`` first, then
    in ``SegmentationClassAug``.

    ``ds[i]`` -> ``(image (H, W, 3) uint8 RGB, label (H, W) uint8)``, 255 = ignore. An image
    is ``JPEGImages/<id>.jpg``, or ``<id>.png`` where there is no .jpg (lossless images, such as
    the HHA images that nyud-fcn32s-hha takes as its input). Missing files are reported when
    the dataset is opened, corrupt ones when read, each by an :class:`InputError` that
    names the file.

    heads: the head names of a net with several heads (SIFT Flow: ``("semantic", "geometric")``),
    whose ground truth lies in a folder per head, as ``fastfcn segment`` writes its labels:
    ``SegmentationClass/<head>/<id>.png``; ``ds[i]`` is then ``(image, {head: label})``. (The
    SIFT Flow release's .mat labels become these PNGs as the reference's siftflow_layers.py
    reads them: ``S - 1`` as uint8, geometric -1 first set to 0, so void is 255.)
    """

    LABEL_DIRS = ("SegmentationClass", "SegmentationClassAug")

    def __init__(self, root: str | os.PathLike, split: str = "val", heads=None):
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"VOC root {root} is not a directory")
        if not (root / "JPEGImages").is_dir():
            found = sorted(p.parent for p in root.glob("*/JPEGImages")) + sorted(
                p.parent for p in root.glob("*/*/JPEGImages")
            )
            if len(found) == 1:
                root = found[0]
            else:
                raise InputError(
                    f"{root} does not look like a VOC root: expected JPEGImages/, SegmentationClass/ and "
                    "ImageSets/Segmentation/ inside it (e.g. VOCdevkit/VOC2012)"
                )
        self.root, self.split = root, split
        list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            have = sorted(p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt"))
            raise InputError(f"split list {list_file} is missing; splits present: {have or 'none'}")
        ids = split_ids(list_file)
        if not ids:
            raise InputError(f"split list {list_file} is empty")
        self.ids = ids
        self.heads = tuple(heads) if heads else None
        self.images, self.labels = [], []
        label_dirs = [root / d for d in self.LABEL_DIRS if (root / d).is_dir()]
        for i in ids:
            img = root / "JPEGImages" / f"{i}.jpg"
            if not img.is_file():
                # A PNG when there is no JPEG: images whose values are measurements (HHA), which
                # JPEG would change, are kept lossless (``write_voc``).
                png = img.with_suffix(".png")
                if not png.is_file():
                    raise InputError(f"image file {img} (or {png.name}; listed in {list_file}) is missing")
                img = png
            if self.heads is None:
                lab = self._label_file(label_dirs, Path(f"{i}.png"), list_file)
            else:
                lab = {h: self._label_file(label_dirs, Path(h, f"{i}.png"), list_file) for h in self.heads}
            self.images.append(img)
            self.labels.append(lab)
        self.class_names = VOC_CLASSES
        self.num_classes = len(VOC_CLASSES)
        names = root / "class_names.txt"  # written by `fastfcn data synth`
        if names.is_file():
            self.class_names = read_class_names(names)
            self.num_classes = len(self.class_names)

    def _label_file(self, label_dirs: list[Path], rel: Path, list_file: Path) -> Path:
        lab = next((d / rel for d in label_dirs if (d / rel).is_file()), None)
        if lab is None:
            want = self.root / "SegmentationClass" / rel
            raise InputError(f"label file {want} (listed in {list_file}) is missing")
        return lab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        image = read_image(self.images[i])
        files = self.labels[i] if self.heads else {None: self.labels[i]}
        labels = {h: _read_label(f) for h, f in files.items()}
        for h, label in labels.items():
            if image.shape[:2] != label.shape:
                raise InputError(
                    f"label file {files[h]} is {label.shape[1]}x{label.shape[0]} but image "
                    f"{self.images[i]} is {image.shape[1]}x{image.shape[0]}; they must match"
                )
        return image, (labels if self.heads else labels[None])


# --------------------------------------------------------------------------- second inputs (NYUDv2)


class Paired:
    """A VOC-layout dataset whose images come with a second input (NYUDv2 fusion): ``ds[i]`` ->
    ``(image, label, {modality: array})``, the file of ``folder`` named as the image (any image
    suffix, ``match_file``). Every pair is found when it is built, so a missing or ambiguous
    file stops the run before the model runs once. ``fastfcn eval`` and ``fastfcn train`` read
    their second inputs through it; ``num_classes`` and ``class_names`` are the dataset's."""

    def __init__(self, ds, modality: str, folder: Path, max_pixels: int | None):
        self.ds, self.modality, self.max_pixels = ds, modality, max_pixels
        self.num_classes, self.class_names = ds.num_classes, ds.class_names
        base = ds.root / "JPEGImages"
        index = StemIndex()
        self.files = [match_file(Path(img), base, Path(folder), modality, index) for img in ds.images]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        image, label = self.ds[i]
        second = read_second(self.files[i], self.modality, self.max_pixels)
        if second.shape[:2] != image.shape[:2]:
            raise InputError(
                f"{self.modality} file {self.files[i]} is {second.shape[1]}x{second.shape[0]} but image "
                f"{self.ds.images[i]} is {image.shape[1]}x{image.shape[0]}; they must match"
            )
        return image, label, {self.modality: second}


# --------------------------------------------------------------------------- synthetic scenes

# Object classes differ by shape AND texture (and lean to a hue); backgrounds take any colour.
SHAPES = ("disc", "box", "triangle", "cross", "ring", "star", "hexagon", "diamond")
TEXTURES = ("stripes", "checker", "dots", "grid", "speckle", "rings", "waves", "gradient")
MAX_CLASSES = len(SHAPES) + 1
MAX_OBJECTS = 3  # a scene has 1-3 objects


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    """Inside test in the object's own frame; u, v are in units of its radius."""
    rho = np.hypot(u, v)
    if shape == "disc":
        return (u * u + (v / aspect) ** 2) <= 1.0
    if shape == "box":
        return (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9 * aspect)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) / aspect <= 1.0
    if shape in ("triangle", "hexagon"):
        # Regular polygon: inside when the projection on every edge normal is below the apothem.
        m = 3 if shape == "triangle" else 6
        th = 2 * np.pi * np.arange(m) / m + (np.pi / 2 if m == 3 else 0.0)
        proj = u[..., None] * np.cos(th) + v[..., None] * np.sin(th)
        return proj.max(-1) <= np.cos(np.pi / m)
    if shape == "cross":
        t = 0.38
        return ((np.abs(u) <= 1) & (np.abs(v) <= t)) | ((np.abs(u) <= t) & (np.abs(v) <= 1))
    if shape == "ring":
        return (rho <= 1.0) & (rho >= 0.5)
    if shape == "star":
        phi = np.arctan2(v, u)
        return rho <= 0.62 + 0.38 * np.cos(5 * phi)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(tex: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A texture pattern in [0, 1], (h, w), from pixel coordinates in the object's frame."""
    p = rng.uniform(5.0, 7.5)  # period in pixels: well above the noise, below the object size
    if tex == "stripes":
        return (np.sin(2 * np.pi * x / p) > 0).astype(np.float32)
    if tex == "checker":
        q = p * 0.8  # coarse cells: at finer ones checker and dots look alike at stride 8
        return ((np.floor(x / q) + np.floor(y / q)) % 2).astype(np.float32)
    if tex == "dots":
        xx, yy = np.mod(x, p) - p / 2, np.mod(y, p) - p / 2
        return (xx * xx + yy * yy <= (0.26 * p) ** 2).astype(np.float32)
    if tex == "grid":
        return ((np.mod(x, p) < 1.6) | (np.mod(y, p) < 1.6)).astype(np.float32)
    if tex == "speckle":
        # Hash of the integer position: a fixed random binary field, two pixels per cell.
        xi, yi = np.floor(x / 2).astype(np.int64), np.floor(y / 2).astype(np.int64)
        h = (xi * 73856093) ^ (yi * 19349663) ^ int(rng.integers(1 << 30))
        return ((h >> 7) & 1).astype(np.float32)
    if tex == "rings":
        return (np.sin(2 * np.pi * np.hypot(x, y) / p) > 0).astype(np.float32)
    if tex == "waves":
        return (np.sin(2 * np.pi * (x + 2.0 * np.sin(2 * np.pi * y / (2.5 * p))) / p) > 0).astype(np.float32)
    if tex == "gradient":
        r = np.hypot(x, y)
        return np.clip(r / (r.max() + 1e-6), 0, 1).astype(np.float32)
    raise ValueError(f"unknown texture {tex!r}")


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.uniform(0, 255, 3)
    b = rng.uniform(0, 255, 3)
    d = b - a
    n = np.linalg.norm(d)
    if n < 110:  # keep the texture visible: push the second colour away from the first
        d = d / (n + 1e-6) if n > 1e-3 else np.ones(3) / np.sqrt(3)
        b = np.clip(a + d * 110, 0, 255)
        if np.linalg.norm(b - a) < 80:
            b = np.clip(a - d * 110, 0, 255)
    return a.astype(np.float32), b.astype(np.float32)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One colour, h in [0, 1) (wraps), s and v in [0, 1] -> RGB float in 0..255."""
    h6 = (h % 1.0) * 6
    c = v * s
    x = c * (1 - abs(h6 % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h6) % 6]
    return (np.array(rgb) + (v - c)) * 255


def _class_colours(cls: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An object's two texture colours: a hue typical of its class (spread over the colour
    wheel, jittered so that neighbouring classes overlap) in a light and a dark shade."""
    hue = (cls - 1) / (num_classes - 1) + rng.normal(0, 0.05)
    sat = rng.uniform(0.45, 1.0)
    light = _hsv_to_rgb(hue, sat, rng.uniform(0.75, 1.0))
    dark = _hsv_to_rgb(hue, sat, rng.uniform(0.15, 0.4))
    return (light, dark) if rng.random() < 0.5 else (dark, light)


# What the synthetic scenes give the two-headed and two-input nets (SyntheticScenes(heads=, second=)).
SYNTHETIC_HEADS = ("semantic", "geometric")  # SIFT Flow's; geometric ids: SIFTFLOW_GEOMETRIC's order
SKY, HORIZONTAL, VERTICAL = range(len(SIFTFLOW_GEOMETRIC))
SYNTHETIC_SECOND = ("depth", "hha")
SYNTHETIC_IMAGES = ("color", "hha")  # what the scenes give as the image (the net's first input)
DEPTH_RANGE_MM = (500, 10_000)  # NYUDv2's depth maps: the Kinect's 0.5 to 10 m
# Focal length over image width: NYUDv2's Kinect colour camera, f = 518.9 px at 640 px wide.
FOCAL_PER_WIDTH = 518.9 / 640


def hha_encode(depth_m: np.ndarray, height_m: np.ndarray, angle_deg: np.ndarray) -> np.ndarray:
    """An HHA image (Gupta et al., ECCV 2014) as NYUDv2's HHA files hold it (rcnn-depth
    ``saveHHA.m``), in their channel order, which fastfcn keeps (``fastfcn.modalities``):
    horizontal disparity ``31000 / depth in cm`` (depth floored at 100 cm), height above the
    ground in cm, and the angle between the surface normal and up in degrees plus 38 (a floor
    38, a wall 128); each rounded and saturated to 0..255 as MATLAB's ``uint8`` does. ->
    (H, W, 3) uint8."""
    hha = np.stack([31000.0 / np.maximum(depth_m * 100, 100), height_m * 100, angle_deg + 38.0], -1)
    return np.clip(np.floor(hha + 0.5), 0, 255).astype(np.uint8)


class SceneLayout:
    """The geometry of synthetic scene ``i``, from a random stream of its own (seed, i): a pinhole
    camera ``camera_m`` above a ground plane, looking level (so the horizon is the principal
    point's row, ``horizon``), with NYUDv2's focal length per width (``FOCAL_PER_WIDTH``). The
    ground recedes upward until it meets a fronto-parallel far plane at ``far_m`` (5-9.5 m), on
    the row ``far_edge`` (30-60% of the height down); the rows above, ``sky_rows`` of them, see
    the far plane (SIFT Flow: the sky). Each object is a fronto-parallel plane at its own depth,
    55-90% of the nearest depth it covers (the ground, or an object painted before it), so every
    object is nearer than all behind it. Depths are clipped to NYUDv2's ``DEPTH_RANGE_MM``."""

    def __init__(self, size: tuple[int, int], seed: int, i: int):
        h, w = size
        rng = np.random.default_rng([seed, i, 0x6E0])
        self.size, self.focal = (h, w), FOCAL_PER_WIDTH * w
        self.camera_m = rng.uniform(1.0, 1.6)
        self.far_m = rng.uniform(5.0, 9.5)
        self.far_edge = rng.uniform(0.3, 0.6) * h
        self.sky_rows = int(np.ceil(self.far_edge))
        self.horizon = self.far_edge - self.focal * self.camera_m / self.far_m
        self.nearer = rng.uniform(0.55, 0.9, MAX_OBJECTS)  # one per object, in paint order
        hue, sat = rng.uniform(0.52, 0.68), rng.uniform(0.35, 0.85)
        self.sky_colours = (_hsv_to_rgb(hue, sat, rng.uniform(0.55, 0.95)),
                            _hsv_to_rgb(hue, 0.3 * sat, rng.uniform(0.85, 1.0)))  # fmt: skip

    def _rows(self) -> np.ndarray:
        return np.arange(self.size[0], dtype=np.float64)[:, None]

    def paint_sky(self, img: np.ndarray) -> None:
        """The sky over the background of the rows above the far edge, in place: a smooth vertical
        gradient from its top colour to a paler one at the far edge (no texture, no clutter)."""
        top, low = self.sky_colours
        t = (np.arange(self.sky_rows) / max(self.sky_rows - 1, 1))[:, None, None]
        img[: self.sky_rows] = (top * (1 - t) + low * t).astype(np.float32)

    def geometric(self, label: np.ndarray) -> np.ndarray:
        """SIFT Flow's geometric classes: sky above the far edge, horizontal below (the ground),
        vertical where an object is (``label`` > 0). -> (H, W) uint8."""
        geo = np.full(self.size, HORIZONTAL, np.uint8)
        geo[: self.sky_rows] = SKY
        geo[label > 0] = VERTICAL
        return geo

    def depth(self, objects: list) -> np.ndarray:
        """The depth map in millimetres, (H, W) uint16: the ground (depth ``f * camera / (row -
        horizon)``, at most the far plane's), then each object of ``objects`` ((y0, x0, mask) in
        paint order) at its own depth, nearer than all it covers."""
        fh = self.focal * self.camera_m
        z = np.repeat(fh / np.maximum(self._rows() - self.horizon, fh / self.far_m), self.size[1], axis=1)
        for k, (y0, x0, mask) in enumerate(objects):
            region = z[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
            region[mask] = self.nearer[k] * region[mask].min()
        return np.clip(np.rint(z * 1000), *DEPTH_RANGE_MM).astype(np.uint16)

    def hha(self, depth_mm: np.ndarray, label: np.ndarray) -> np.ndarray:
        """The HHA image (``hha_encode``) of this geometry seen at ``depth_mm``: height above the
        ground from each pixel's row and depth, the angle 0 degrees on the ground and 90 on the
        far plane and the objects (``label`` > 0), all upright. -> (H, W, 3) uint8."""
        z = depth_mm / 1000.0
        rows = self._rows()
        height = self.camera_m - (rows - self.horizon) * z / self.focal
        upright = (rows < self.sky_rows) | (label > 0)
        return hha_encode(z, height, np.where(upright, 90.0, 0.0))


def _check_kind(heads, second: str | None, image: str) -> None:
    """InputError unless the scenes can make these heads, second input and image."""
    if heads is not None and tuple(heads) != SYNTHETIC_HEADS:
        raise InputError(f"synthetic scenes have the heads {', '.join(SYNTHETIC_HEADS)} (SIFT Flow's) or "
                         f"one; got heads {tuple(heads)}")  # fmt: skip
    if second not in (None, *SYNTHETIC_SECOND):
        raise InputError(f"synthetic scenes make a second input of {' or '.join(SYNTHETIC_SECOND)}; "
                         f"got {second!r}")  # fmt: skip
    if image not in SYNTHETIC_IMAGES or image == second:
        raise InputError(f"synthetic scenes make an image of {' or '.join(SYNTHETIC_IMAGES)}, other than the "
                         f"second input; got image {image!r} with second {second!r}")  # fmt: skip


class SyntheticScenes:
    """Deterministic generated scenes that take context to segment.

    Each scene has a textured, noisy background (smooth blobs of two random colours, grain,
    clutter lines) and 1-3 objects. Object class ``k`` (1..num_classes-1) has its own shape
    and its own texture (``SHAPES[k-1]``, ``TEXTURES[k-1]``) in a light and a dark shade of
    a hue typical of the class; hues are jittered so that neighbouring classes overlap, and
    the background takes any colour, so colour alone does not decide a pixel. Objects vary
    in scale (radius 22-42% of the shorter side), aspect, rotation and texture phase,
    occlude each other in paint order and may be cut by the image border.

    ``ds[i]`` -> ``(image (H, W, 3) uint8 RGB, label (H, W) uint8)``. Scene ``i`` depends
    only on ``(seed, i, size, num_classes)``, so datasets with different seeds are disjoint
    draws and any index can be read in any order.

    Each scene also has a geometry (``SceneLayout``, drawn from a stream of its own, so the
    image and label above are the same with or without it): a camera at a height above a ground
    plane that recedes upward to a far plane, and every object a fronto-parallel plane nearer
    than all it covers. It gives what the two-headed and two-input nets need:

    - ``heads=("semantic", "geometric")`` (SIFT Flow's): ``ds[i]`` -> ``(image, {"semantic":
      label, "geometric": geo})``. ``geo`` (H, W) uint8 holds SIFT Flow's geometric classes in
      their order: 0 sky (the background above the ground's far edge), 1 horizontal (the
      ground), 2 vertical (the objects); no void. So that the sky is seen, the image shows it:
      the background above the far edge is a smooth vertical gradient of a sky colour instead of
      textured clutter (objects and noise as in the one-head scene; elsewhere the same pixels).
      The far edge moves from scene to scene, so the rows alone do not decide; the image does:
      siftflow-fcn16s at width 1/8 on 64 px scenes, batch 4, 400 Adam steps (82 s, one thread
      of a 2-core Zen 4) reached validation mean IU 78.3 geometric, 39.1 semantic (5 classes).
      ``num_classes`` stays the semantic classes; ``self.num_classes`` and ``class_names``
      count both heads (semantic, then ``sky, horizontal, vertical``), as a VOC-layout folder's
      class_names.txt does.
    - ``second="depth"``: ``ds[i]`` -> ``(image, label, {"depth": (H, W) uint16 mm})``, in
      NYUDv2's 500..10000 mm; ``second="hha"``: ``{"hha": (H, W, 3) uint8}``, encoded from the
      same geometry as Gupta et al.'s saveHHA.m (``hha_encode``). The image is the one-head
      scene's.
    - ``image="hha"`` (nyud-fcn32s-hha, whose one input is an HHA image, read from the image
      slot as a real data set's HHA files are): the image is that HHA encoding (the one
      ``second="hha"`` gives) in place of the colour scene; the labels are the same.
    """

    def __init__(self, n: int, size: int | tuple[int, int] = 96, seed: int = 0, num_classes: int = 5,
                 heads=None, second: str | None = None, image: str = "color"):  # fmt: skip
        if not 2 <= num_classes <= MAX_CLASSES:
            raise InputError(
                f"num_classes must be in 2..{MAX_CLASSES} (background + shapes); got {num_classes}"
            )
        _check_kind(heads, second, image)
        if n < 0:
            raise InputError(f"n must be >= 0; got {n}")
        if seed < 0:  # numpy's generators take none; their own error names no option
            raise InputError(f"seed must be >= 0; got {seed}")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if h < 8 or w < 8:
            raise InputError(f"scene size must be at least 8x8; got {h}x{w}")
        if h * w > DEFAULT_MAX_PIXELS:
            # The pixel grids below take 16 bytes a pixel at once (a --size 96000 typo: 147 GB).
            raise InputError(
                f"scene size {h}x{w} is over {DEFAULT_MAX_PIXELS} pixels, the most a Segmenter takes by "
                "default; expected a smaller --size"
            )
        self.n, self.size, self.seed = int(n), (int(h), int(w)), int(seed)
        self.heads, self.second = (SYNTHETIC_HEADS if heads is not None else None), second
        self.image = image
        self.semantic_classes = int(num_classes)  # background + object shapes
        self.class_names = ("background",) + SHAPES[: num_classes - 1]
        if self.heads:
            self.class_names += SIFTFLOW_GEOMETRIC
        self.num_classes = len(self.class_names)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self._yy, self._xx = yy, xx

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} scenes")
        i %= self.n
        geometry = self.heads or self.second or self.image != "color"
        layout = SceneLayout(self.size, self.seed, i) if geometry else None
        image, label, objects = self._render(i, layout if self.heads else None)
        if layout is None:
            return image, label
        target = {"semantic": label, "geometric": layout.geometric(label)} if self.heads else label
        depth = layout.depth(objects) if self.second or self.image == "hha" else None
        hha = layout.hha(depth, label) if "hha" in (self.second, self.image) else None
        if self.image == "hha":
            image = hha
        if self.second is None:
            return image, target
        return image, target, {self.second: depth if self.second == "depth" else hha}

    def _render(self, i: int, sky: SceneLayout | None = None):
        """(image, label, [(y0, x0, mask) of each object painted, in paint order]) of scene ``i``;
        with ``sky``, the background above its far edge is that layout's sky."""
        rng = np.random.default_rng([self.seed, i, 0x5EED])
        h, w = self.size
        img = self._background(rng)
        if sky is not None:
            sky.paint_sky(img)
        label = np.zeros((h, w), np.uint8)
        objects = []
        s = min(h, w)
        for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
            cls = int(rng.integers(1, self.semantic_classes))
            r = rng.uniform(0.22, 0.42) * s
            # Centres may lie a little outside the frame, so objects are cut by the border.
            cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
            y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
            x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
            if y1 - y0 < 2 or x1 - x0 < 2:
                continue
            th = rng.uniform(0, 2 * np.pi)
            c, sn = np.cos(th), np.sin(th)
            dx, dy = self._xx[y0:y1, x0:x1] - cx, self._yy[y0:y1, x0:x1] - cy
            u, v = c * dx + sn * dy, -sn * dx + c * dy
            mask = _shape_mask(SHAPES[cls - 1], u / r, v / r, rng.uniform(0.65, 1.0))
            if not mask.any():
                continue
            t2 = rng.uniform(0, 2 * np.pi)  # texture orientation independent of the outline
            c2, s2 = np.cos(t2), np.sin(t2)
            tu, tv = c2 * dx + s2 * dy + rng.uniform(0, 20), -s2 * dx + c2 * dy + rng.uniform(0, 20)
            pat = _texture(TEXTURES[cls - 1], tu, tv, rng)[..., None]
            a, b = _class_colours(cls, self.semantic_classes, rng)
            obj = a * (1 - pat) + b * pat
            region = img[y0:y1, x0:x1]
            region[mask] = obj[mask]
            label[y0:y1, x0:x1][mask] = cls
            objects.append((y0, x0, mask))
        img += rng.normal(0, rng.uniform(4, 12), img.shape).astype(np.float32)
        return np.clip(img, 0, 255).astype(np.uint8), label, objects

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.size
        a, b = _two_colours(rng)
        # Smooth blobs: a coarse random field upsampled bilinearly.
        g = rng.uniform(0, 1, (int(rng.integers(3, 7)), int(rng.integers(3, 7)))).astype(np.float32)
        t = np.asarray(Image.fromarray(g, mode="F").resize((w, h), Image.BILINEAR))[..., None]
        img = a * (1 - t) + b * t * 0.6 + a * t * 0.4
        # Clutter: a few thin lines of random colour; background, not objects.
        for _ in range(int(rng.integers(0, 4))):
            th = rng.uniform(0, np.pi)
            off = rng.uniform(-0.5, 0.5) * min(h, w)
            d = (self._xx - w / 2) * np.cos(th) + (self._yy - h / 2) * np.sin(th) - off
            img[np.abs(d) < rng.uniform(0.6, 1.4)] = rng.uniform(0, 255, 3)
        return img.astype(np.float32)


class MovingScenes:
    """A clip of generated scenes: the objects of :class:`SyntheticScenes` (class shape and
    texture, class hue) glide across a fixed background, bouncing off the borders, and
    rotate, texture and all; each frame has fresh sensor noise.

    ``clip[k]`` -> ``(image (H, W, 3) uint8 RGB, label (H, W) uint8)`` of frame ``k``.
    ``radius``: object radii in pixels; the default matches the 96x96 training scenes
    (22-42% of 96), so the demo model sees objects at the scale it learned.
    """

    def __init__(self, n: int, size: int | tuple[int, int] = (128, 192), seed: int = 0, num_classes: int = 5,
                 objects: int = 3, radius: tuple[float, float] = (24.0, 36.0)):  # fmt: skip
        self.scenes = SyntheticScenes(0, size, seed, num_classes)
        self.n, self.size, self.seed = int(n), self.scenes.size, int(seed)
        h, w = self.size
        rng = np.random.default_rng([self.seed, 0xC11B])
        self.background = self.scenes._background(rng)
        self.objects = []
        first = int(rng.integers(num_classes - 1))
        for k in range(objects):
            cls = 1 + (first + k) % (num_classes - 1)  # distinct classes while there are enough
            self.objects.append({
                "cls": cls,
                "r": rng.uniform(*radius),
                "aspect": rng.uniform(0.7, 1.0),
                "pos": rng.uniform(0.2, 0.8, 2) * (h, w),
                "vel": rng.uniform(0.6, 1.6, 2) * rng.choice([-1, 1], 2),  # pixels per frame
                "th": rng.uniform(0, 2 * np.pi),
                "spin": rng.uniform(0.02, 0.06) * rng.choice([-1, 1]),  # radians per frame
                "colours": _class_colours(cls, num_classes, rng),
                "tex_seed": int(rng.integers(1 << 30)),
            })  # fmt: skip

    def __len__(self) -> int:
        return self.n

    def _place(self, o: dict, k: int) -> tuple[float, float, float]:
        """Centre (y, x) and angle of object ``o`` at frame ``k``: straight lines reflected
        at the borders (a triangle wave), so any frame is computed directly."""
        h, w = self.size
        out = []
        for p, v, lo, hi in zip(o["pos"], o["vel"], (0.0, 0.0), (h, w)):
            span = hi - lo
            q = (p - lo + v * k) % (2 * span)
            out.append(lo + (q if q <= span else 2 * span - q))
        return out[0], out[1], o["th"] + o["spin"] * k

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= k < self.n:
            raise IndexError(f"frame {k} out of range for {self.n} frames")
        h, w = self.size
        xx, yy = self.scenes._xx, self.scenes._yy
        img = self.background.copy()
        label = np.zeros((h, w), np.uint8)
        for o in self.objects:
            cy, cx, th = self._place(o, k)
            c, sn = np.cos(th), np.sin(th)
            dx, dy = xx - cx, yy - cy
            u, v = c * dx + sn * dy, -sn * dx + c * dy
            mask = _shape_mask(SHAPES[o["cls"] - 1], u / o["r"], v / o["r"], o["aspect"])
            # The texture in the object's own frame (u, v): it turns and travels with the object.
            pat = _texture(TEXTURES[o["cls"] - 1], u, v, np.random.default_rng(o["tex_seed"]))[..., None]
            a, b = o["colours"]
            img[mask] = (a * (1 - pat) + b * pat)[mask]
            label[mask] = o["cls"]
        rng = np.random.default_rng([self.seed, k, 0x7015E])
        img = img + rng.normal(0, 6, img.shape).astype(np.float32)
        return np.clip(img, 0, 255).astype(np.uint8), label


def heldout_scenes(n: int = HELDOUT_N, size: int = HELDOUT_SIZE, num_classes: int = 5, heads=None,
                   second: str | None = None, image: str = "color") -> SyntheticScenes:  # fmt: skip
    """The held-out synthetic split: a fixed seed that training refuses (heads, second, image: as
    SyntheticScenes takes them, for the two-headed, two-input and HHA nets)."""
    return SyntheticScenes(n, size, HELDOUT_SEED, num_classes, heads=heads, second=second, image=image)


def scene_options(inputs, heads=None) -> dict:
    """SyntheticScenes' ``heads``, ``second`` and ``image`` for a net that takes ``inputs``
    (modality names, in order) and has the heads named ``heads`` (None: one); InputError saying
    what the scenes cannot make."""
    inputs = tuple(inputs)
    if not 1 <= len(inputs) <= 2:
        raise InputError(f"synthetic scenes make one or two inputs; got {', '.join(inputs) or 'none'}")
    second = inputs[1] if len(inputs) == 2 else None
    options = {"heads": tuple(heads) if heads else None, "second": second, "image": inputs[0]}
    _check_kind(**options)
    return options


def write_voc(dataset, out: str | os.PathLike, split: str, *, start: int = 0, quality: int = 95) -> list[str]:
    """Write ``dataset`` in the VOC layout under ``out`` as ``split``; returns the ids written.

    Images go to ``JPEGImages/<id>.jpg``, labels to ``SegmentationClass/<id>.png`` as palette
    PNGs with the VOC colour map (255 = void), the id list to ``ImageSets/Segmentation/<split>.txt``.
    What the readers of the other nets take goes where they look for it:

    - labels per head (items ``(image, {head: label})``, SIFT Flow): ``SegmentationClass/<head>/<id>.png``,
      as ``VOCSegmentation(heads=...)`` reads them;
    - a second input (items ``(image, label, {modality: array})``): ``<modality>/<id>.png``, as
      ``read_second`` reads it: depth a 16-bit greyscale PNG of the millimetres, HHA an RGB PNG
      (``fastfcn train/eval --depth OUT/depth`` or ``--hha OUT/hha`` pair them by name);
    - an image that is not a photograph (``dataset.image`` "hha": its values are measurements,
      which JPEG would change): ``JPEGImages/<id>.png``, lossless.
    """
    out = Path(out)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / d).mkdir(parents=True, exist_ok=True)
    lossless = getattr(dataset, "image", "color") != "color"
    ids = []
    for i in range(len(dataset)):
        image, label, *second = dataset[i]
        name = f"{split}_{start + i:06d}"
        if lossless:
            Image.fromarray(image).save(out / "JPEGImages" / f"{name}.png")
        else:
            # 4:4:4 chroma: the scenes have fine coloured textures that 4:2:0 would smear.
            Image.fromarray(image).save(out / "JPEGImages" / f"{name}.jpg", quality=quality, subsampling=0)
        labels = label if isinstance(label, dict) else {None: label}
        for head, lab in labels.items():
            folder = out / "SegmentationClass" / (head or "")
            folder.mkdir(exist_ok=True)
            save_labels(lab, None, folder / f"{name}.png")  # a palette PNG, the VOC colour map
        for modality, array in (second[0] if second else {}).items():
            (out / modality).mkdir(exist_ok=True)
            _write_second(array, modality, out / modality / f"{name}.png")
        ids.append(name)
    (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    names = getattr(dataset, "class_names", None)
    if names:
        (out / "class_names.txt").write_text("\n".join(names) + "\n")
    return ids


def _write_second(array: np.ndarray, modality: str, path: Path) -> None:
    """A second input as a PNG that ``read_second`` gives back unchanged."""
    if modality == "depth":
        if array.dtype != np.uint16:
            raise InputError(f"a depth map is written as 16-bit millimetres; got dtype {array.dtype}")
        # Pillow writes a uint16 array ("I;16") as a 16-bit greyscale PNG, read back as "I" or "I;16".
        Image.fromarray(np.ascontiguousarray(array)).save(path)
    else:
        Image.fromarray(np.ascontiguousarray(array, np.uint8)).save(path)
