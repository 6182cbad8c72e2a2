"""`make demo`: reconstruct the bundled sample data with every method and compare.

Runs the real CLI (`drip info`, `drip reconstruct`) on sample_data/ and on colour crops it
simulates from two held-out photographs (`drip simulate`; the grayscale blur model serves them
with --each-channel), writes the reconstructions and JSON reports to demo_out/, and prints one
table: PSNR, SSIM and discrepancy ratios per operator and method. Every reconstruction must
fit its data (fit = 1). `drip export` writes the colour crops and their DRIP reconstructions as
PNG files (demo_out/pictures/). Then a user's own photographs: crops of the same photographs
blurred as a camera blurs a scene that goes on beyond its frame (the valid boundary), written
as PNG files, which `drip import` reads back with their noise estimated (and the scenes as the
ground truth) for TV and DRIP to reconstruct; the tomography sample's sinograms, written
as a float TIFF stack (as CT software keeps them) and imported with their noise estimated, for
DRIP, and projections of the same images from a scanner whose rotation axis is off the
detector's middle, with their angles, as datasets of an HDF5 file in the Data Exchange layout
(`scan.h5::exchange/data --projections`, `--angle-file scan.h5::exchange/theta`, the axis found
with `--center-offset auto`); and noisy colour photographs (a .npy array) imported for
denoising with their noise estimated from the images, for TV and DRIP (the grayscale denoising
model on each channel). Then
`drip evaluate` on the blur sample compares CGLS, TV, DRIP
and the unrolled baseline network across noise levels (demo_out/evaluate_blur/: tables,
robustness.png, previews.png).

DRIP runs with the pretrained model where sample_data/ ships one; elsewhere with an untrained model
(the regularizer's starting point: smoothed isotropic TV plus a weak random filter bank), written to
demo_out/ and labelled "drip (untrained)" in the table.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from drip_cli.console import console  # 120 columns when not a terminal, like the CLI

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_data"
OUT = ROOT / "demo_out"
RUNS = [("blur", "Gaussian blur, sigma 2, 2% noise"),
        ("inpainting", "50% of pixels observed, 2% noise"),
        ("tomography", "limited angle: 32 angles over 120 deg, 2% noise"),
        ("denoise", "noise alone, 10%"),
        ("matrix", "user CSR matrix: 2x2 downsampling, 1% noise"),
        ("colour blur", "colour crops, blur sigma 2, 2% noise; the grayscale blur model on "
                        "each channel (--each-channel)")]
# the colour run's data, simulated into demo_out/ from two of the held-out photographs
COLOUR = ["skimage:coffee,astronaut", "--channels", "3", "--operator", "blur", "--blur-sigma",
          "2", "--noise-percent", "2", "--crop-size", "64", "--crops-per-image", "8", "--seed",
          "2"]
# the same photographs as a camera blurs them: each 76x76 scene seen through a 13x13 PSF,
# 64x64 pixels measured (the valid boundary)
CAMERA = [*COLOUR[1:COLOUR.index("--crop-size")], "--blur-boundary", "valid", "--crop-size",
          "76", "--crops-per-image", "4", "--seed", "3"]
# noisy colour photographs (crops of the same photographs, 5% noise) for the denoising import
NOISY = [COLOUR[0], "--channels", "3", "--operator", "denoise", "--noise-percent", "5",
         "--crop-size", "64", "--crops-per-image", "8", "--seed", "4"]
METHODS = ["cgls", "tv"]
MODELS = {"blur": SAMPLES / "drip_blur.safetensors",   # pretrained sample models, where shipped
          "tomography": SAMPLES / "drip_tomography.safetensors",
          "inpainting": SAMPLES / "drip_inpainting.safetensors",
          "denoise": SAMPLES / "drip_denoise.safetensors",
          "colour blur": SAMPLES / "drip_blur.safetensors"}
MODEL_OPTIONS = {"colour blur": ["--each-channel"]}
UNROLLED = SAMPLES / "unrolled_blur.safetensors"       # the baseline, same data and budget


def untrained_model(name: str) -> Path:
    """An untrained DRIP model file for the sample data ``name`` (its image shape and operator)."""
    from drip_cli.io import MeasurementFile
    from drip_cli.io.models import ModelInfo, save_model
    from drip_cli.regularizers.model import DripModel, ModelConfig

    with MeasurementFile(SAMPLES / f"{name}.h5") as data:
        shape, kind = tuple(data.image_shape), data.operator.kind
    model = DripModel(ModelConfig(image_channels=shape[0], latent_channels=shape[0]))
    path = OUT / f"drip_untrained_{name}.safetensors"
    save_model(path, model, ModelInfo(config=model.config, operator_kind=kind, image_shape=shape,
                                      noise_percent=(1.0, 5.0), extra={"untrained": True}))
    return path


def single_solve(model: Path) -> list[str]:
    """The options that make a model's reconstruction one convex solve (--reweight 0, and
    --patch-weight 0 where it has a patch pass), which the demo shows too; none for a model
    that solves once by default."""
    from drip_cli.io.models import load_model

    drip = load_model(model)[0]
    options = ["--reweight", "0"] if drip.config.reweight else []
    if drip.runs_patch_pass():
        options += ["--patch-weight", "0"]
    return options


def drip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "drip_cli", *args], check=True)


def write_scan(sample: Path, scan: Path) -> None:
    """Projections of the sample's images as a scanner's software might store them: an HDF5
    file in the layout of Data Exchange (``exchange/data`` of (angles, slices, detectors),
    ``exchange/theta``), not drip's, from a detector of 97 whose middle is not where the
    rotation axis projects (3 detectors off, simulated at 2% noise)."""
    import h5py

    simulated = scan.with_name("scan_simulated.h5")
    drip("simulate", f"{sample}::ground_truth", str(simulated), "--operator", "tomography",
         "--angles", "32", "--angle-range", "120", "--detectors", "97", "--center-offset", "3",
         "--noise-percent", "2", "--seed", "1", "--quiet")
    with h5py.File(simulated, "r") as f, h5py.File(scan, "w") as out:
        # Data Exchange keeps projections: (angles, slices, detectors)
        out["exchange/data"] = f["measurements"][:, 0].transpose(1, 0, 2)
        out["exchange/theta"] = f["operator/angles_deg"][()]
    simulated.unlink()


def main() -> None:
    OUT.mkdir(exist_ok=True)
    start = time.perf_counter()
    console.rule("[bold]drip demo: reconstructions with a guaranteed data fit")
    drip("info", str(SAMPLES / "tomography.h5"))
    rows = []
    files = {name: SAMPLES / f"{name}.h5" for name, _ in RUNS}
    files["colour blur"] = OUT / "colour_blur.h5"
    drip("simulate", COLOUR[0], str(files["colour blur"]), *COLOUR[1:], "--quiet")
    for name, description in RUNS:
        model = MODELS.get(name)
        pretrained = model is not None and model.exists()
        if not pretrained:
            model = untrained_model(name)
        runs = [(method, []) for method in METHODS] + [("drip", [])]
        fewer = single_solve(model) if pretrained else []
        if fewer:
            runs.append(("drip", fewer))
        for method, options in runs:
            label = " ".join([method, *options])
            console.rule(f"{name} ({description}): {label}")
            stem = name.replace(" ", "_") + f"_{method}" + ("_single_pass" if options else "")
            report = OUT / f"{stem}.json"
            extra = (["--model", str(model), *MODEL_OPTIONS.get(name, []), *options]
                     if method == "drip" else [])
            drip("reconstruct", str(files[name]), "--out", str(OUT / f"{stem}.h5"),
                 "--method", method, "--report", str(report), "--device", "cpu", *extra)
            summary = json.loads(report.read_text())
            summary["method"] = label if pretrained or method != "drip" else "drip (untrained)"
            rows.append((name, summary))
    table = Table(title="drip demo: 16 held-out 64x64 photo crops per operator (tau = 1)",
                  title_justify="left")
    for header in ("operator", "method", "PSNR", "SSIM", "fit", "max ratio", "iters", "s/image"):
        table.add_column(header, justify="left" if header in ("operator", "method") else "right",
                         no_wrap=True)
    for name, s in rows:
        table.add_row(name, s["method"], f"{s['psnr_mean']:.2f}", f"{s['ssim_mean']:.3f}",
                      f"{s['fit_fraction']:.2f}", f"{s['discrepancy_ratio_max']:.4f}",
                      f"{s['iterations_mean']:.0f}", f"{s['seconds_per_image']:.3f}")
    console.rule()
    console.print(table)
    pictures = OUT / "pictures"   # the colour crops and their DRIP reconstructions, to look at
    drip("export", str(files["colour blur"]), str(pictures / "colour_truth"), "--quiet")
    drip("export", str(OUT / "colour_blur_drip.h5"), str(pictures / "colour_drip"), "--quiet")
    console.rule("your own measurements: photographs blurred by a camera (the valid boundary) "
                 "-> pictures -> drip import (noise estimated) -> drip reconstruct")
    camera = OUT / "camera_blur.h5"   # 76x76 scenes, of which the camera measured 64x64 pixels
    drip("simulate", COLOUR[0], str(camera), *CAMERA, "--quiet")
    blurred, scenes = pictures / "camera_blurred", pictures / "camera_scenes"
    drip("export", str(camera), str(blurred), "--dataset", "measurements", "--quiet")
    drip("export", str(camera), str(scenes), "--quiet")
    mine = OUT / "camera_blurred_imported.h5"
    drip("import", str(blurred), str(mine), "--operator", "blur", "--blur-sigma", "2",
         "--blur-boundary", "valid", "--estimate-noise", "--ground-truth", str(scenes), "--quiet")
    for method, extra in (("tv", []), ("drip", ["--model", str(MODELS["colour blur"]),
                                                "--any-size", "--each-channel"])):
        drip("reconstruct", str(mine), "--method", method, *extra, "--out",
             str(OUT / f"camera_blurred_imported_{method}.h5"), "--device", "cpu", "--quiet")
    console.rule("your own sinograms: a float TIFF stack -> drip import (noise estimated) -> "
                 "drip reconstruct")
    arrays = OUT / "arrays"
    arrays.mkdir(exist_ok=True)
    sinograms, truth = arrays / "sinograms.tif", arrays / "truth.tif"
    drip("export", str(SAMPLES / "tomography.h5"), str(sinograms), "--dataset", "measurements",
         "--quiet")
    drip("export", str(SAMPLES / "tomography.h5"), str(truth), "--quiet")
    mine = OUT / "sinograms_imported.h5"
    drip("import", str(sinograms), str(mine), "--operator", "tomography", "--angle-range", "120",
         "--estimate-noise", "--ground-truth", str(truth), "--quiet")
    drip("reconstruct", str(mine), "--model", str(MODELS["tomography"]), "--out",
         str(OUT / "sinograms_imported_drip.h5"), "--device", "cpu", "--quiet")
    console.rule("your own scan in HDF5, its axis off the detector's middle: projections "
                 "and angles as datasets of any layout (FILE.h5::DATASET) -> drip import "
                 "--projections --angle-file --center-offset auto -> drip reconstruct")
    scan = arrays / "scan.h5"
    write_scan(SAMPLES / "tomography.h5", scan)
    mine = OUT / "scan_imported.h5"
    drip("import", f"{scan}::exchange/data", str(mine), "--operator", "tomography",
         "--projections", "--angle-file", f"{scan}::exchange/theta", "--image-size", "64",
         "--center-offset", "auto", "--estimate-noise", "--ground-truth", str(truth), "--quiet")
    drip("reconstruct", str(mine), "--model", str(MODELS["tomography"]), "--out",
         str(OUT / "scan_imported_drip.h5"), "--device", "cpu", "--quiet")
    console.rule("your own noisy photographs: a .npy array -> drip import (noise estimated from "
                 "the images' statistics) -> drip reconstruct")
    noisy = OUT / "noisy.h5"
    drip("simulate", *NOISY, str(noisy), "--quiet")
    photos, clean = arrays / "noisy_photos.npy", arrays / "noisy_truth.npy"
    drip("export", str(noisy), str(photos), "--dataset", "measurements", "--quiet")
    drip("export", str(noisy), str(clean), "--quiet")
    mine = OUT / "noisy_imported.h5"
    drip("import", str(photos), str(mine), "--operator", "denoise", "--estimate-noise",
         "--ground-truth", str(clean), "--quiet")
    for method, extra in (("tv", []), ("drip", ["--model", str(MODELS["denoise"]),
                                                "--each-channel"])):
        drip("reconstruct", str(mine), "--method", method, *extra, "--out",
             str(OUT / f"noisy_imported_{method}.h5"), "--device", "cpu", "--quiet")
    console.rule("blur across noise levels: drip evaluate (the unrolled network has no fit guarantee)")
    models = [arg for path in (MODELS["blur"], UNROLLED) if path.exists()
              for arg in ("--model", str(path))]
    # every solver run to convergence: TV needs more than its default 5000 iterations on one
    # crop at 1% noise (its mean moves by under 0.01 dB; evaluate would say so in a warning)
    drip("evaluate", str(SAMPLES / "blur.h5"), *models, "--out", str(OUT / "evaluate_blur"),
         "--noise-percent", "1,2,5,10,20", "--max-iterations", "20000", "--device", "cpu")
    console.print(f"outputs in {OUT.relative_to(ROOT)}/ (pictures: {pictures.relative_to(ROOT)}/); "
                  f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
