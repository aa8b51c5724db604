"""What a pretrained ExtreMA encoder looks at, its weights in timm's ViT layout, and the curves of runs.

Pictures: one PNG per image, a row of panels: the input (resized and centre-cropped to --img-size), the first three
principal components of its patch tokens (after the final norm) as RGB, then the attention of the last
class-attention block's cls query to the patches (its share on itself dropped, each head's weights renormalised to
sum to 1), the heads' mean and then head by head (white = most), per patch (nearest-neighbour upsampling).

    python visualize.py --pretrained CKPT --device cpu cat.jpg dog.png    # output/visualize/cat_attention.png ...
    python visualize.py --data synthetic --arch vit_tiny --img-size 64 --patch-size 8 --device cpu

Export: --export-timm FILE writes one encoder (--branch; a fine-tuned checkpoint has one, with its head) as
the state_dict of timm's VisionTransformer with class_token=False, global_pool="avg", fc_norm=True, with
the arguments that build it, and names what that layout cannot hold (the class-attention blocks, ...):

    python visualize.py --pretrained CKPT --branch online --export-timm output/vit_base_timm.pth

--export-hf DIR writes the same model as a Hugging Face folder in timm's layout (config.json, model.safetensors, with
timm's save_for_hf), which timm.create_model("local-dir:DIR", pretrained=True) loads; publish it with
huggingface_hub.upload_folder(repo_id="you/extrema-vit", folder_path=DIR). --export-onnx FILE writes the encoder
as ONNX, input `images` (B, C, --img-size, --img-size), outputs `tokens` (B, N, D) and `instance` (B, D):

    python visualize.py --pretrained CKPT --export-hf output/extrema_hf --export-onnx output/extrema.onnx

Curves: --curves LOG [LOG ...] draws the per-epoch records of one or more log.jsonl files (or the folders that
hold them) into one PNG: training loss, target_std, k-NN top-1 of the monitor (dotted: at initialisation) and lr
against epoch, one colour per run, labelled by its folder. Needs matplotlib (pip install matplotlib):

    python visualize.py --curves output/pretrain output/pretrain_infonce --output curves.png
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import to_pil_image
from torchvision.utils import make_grid

import data
import models
import utils


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("images", nargs="*", help="image files (any format PIL reads)")
    p.add_argument("--data", choices=["synthetic"], default=None,
                   help="'synthetic': pictures of generated images instead of image files")
    p.add_argument("--synthetic-size", type=int, default=2, help="synthetic images to draw")
    p.add_argument("--output-dir", default="output/visualize", help="the PNGs go here")
    utils.add_encoder_args(p, None, branch="momentum",
                           img_help="side of the square the images are resized and cropped to (pictures), and the "
                                    "ONNX input's (default: the --pretrained checkpoint's, else 224)")
    p.add_argument("--export-timm", default=None, metavar="FILE",
                   help="write the encoder of --pretrained in timm's ViT layout to FILE instead of pictures")
    p.add_argument("--export-hf", default=None, metavar="DIR",
                   help="write the encoder of --pretrained as a Hugging Face folder of timm's (needs timm)")
    p.add_argument("--export-onnx", default=None, metavar="FILE",
                   help="write the encoder of --pretrained as ONNX (needs onnxscript), batch size free")
    p.add_argument("--curves", nargs="+", default=None, metavar="LOG",
                   help="draw the curves of these log.jsonl files (or their folders) instead of pictures")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="the PNG of --curves (default: <output-dir>/curves.png)")
    return data.encoder_inputs(utils.parse_args(p, argv))


def timm_export(args):
    """(state_dict, timm_kwargs, left_out) of the --pretrained encoder in timm's ViT layout."""
    try:
        state_dict, left_out = models.timm_state_dict(utils.load_checkpoint(args.pretrained), args.branch)
        return state_dict, models.timm_vit_kwargs(state_dict, args.arch), left_out
    except ValueError as e:
        utils.fail(f"{args.pretrained}: {e}")


def export_timm(args):
    """Write {'state_dict', 'timm_kwargs', 'left_out', 'mean', 'std' (of inputs in [0, 1])}, say how to load it."""
    state_dict, kwargs, left_out = timm_export(args)
    os.makedirs(os.path.dirname(args.export_timm) or ".", exist_ok=True)
    utils.save_checkpoint(dict(state_dict=state_dict, timm_kwargs=kwargs, left_out=left_out, mean=args.mean,
                               std=args.std), args.export_timm)
    head = f"fc_norm and a {kwargs['num_classes']}-class head" if kwargs["num_classes"] else "a new fc_norm, no head"
    print(f"wrote {args.export_timm}: {kwargs['depth']} blocks on a {kwargs['img_size'] // kwargs['patch_size']}^2 "
          f"patch grid, {head}")
    print(f"left out (no place in timm's ViT): {', '.join(left_out) or 'nothing'}")
    print(f"load: timm.create_model('vit_base_patch16_224', **export['timm_kwargs']).load_state_dict("
          f"export['state_dict']) with export = torch.load('{args.export_timm}')")


def export_hf(args):
    """Write the timm model of export_timm, with its input statistics, as a Hugging Face folder (timm's save_for_hf)."""
    timm = utils.optional_import("timm", "timm", "--export-hf")
    utils.optional_import("safetensors", "safetensors", "--export-hf")
    state_dict, kwargs, _ = timm_export(args)
    model = timm.create_model("vit_base_patch16_224", **kwargs)
    model.load_state_dict(state_dict)
    timm.models.save_for_hf(model, args.export_hf, safe_serialization=True,
                            model_config={"pretrained_cfg": {"tag": "extrema", "license": "mit"}},
                            data_config={"mean": args.mean, "std": args.std})
    print(f"wrote {args.export_hf}: load with timm.create_model('local-dir:{args.export_hf}', pretrained=True)")


def export_onnx(args):
    """Write the encoder as ONNX with torch.export's exporter (onnx, onnxscript): `images` (B, C, S, S) -> `tokens`
    (B, N, D), `instance` (B, D), both after the final norm, B free."""
    utils.optional_import("onnxscript", "onnxscript", "--export-onnx")
    encoder = models.pretrained_encoder(utils.load_checkpoint(args.pretrained), args.branch)
    images = torch.zeros(2, encoder.in_chans, args.img_size, args.img_size)
    os.makedirs(os.path.dirname(args.export_onnx) or ".", exist_ok=True)
    torch.onnx.export(encoder, (images,), args.export_onnx, input_names=["images"], output_names=["tokens", "instance"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    print(f"wrote {args.export_onnx}: images (B, {encoder.in_chans}, {args.img_size}, {args.img_size}) normalised "
          f"with mean {args.mean} and std {args.std} -> tokens (B, N, {encoder.embed_dim}), instance "
          f"(B, {encoder.embed_dim})")


CURVES = (("train_loss", "training loss"), ("target_std", "target_std (collapse below 0.1)"),
          ("knn_acc1", "monitor: k-NN top-1 % (dotted: at initialisation)"), ("lr", "learning rate"))


def read_epochs(path):
    """The per-epoch records (with an 'epoch', not --eval-only) of a log.jsonl or of the one in folder `path`; a
    one-line error for a missing file, a line that is not JSON or a log without epochs."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.jsonl")
    if not os.path.isfile(path):
        utils.fail(f"log {path} does not exist")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:
                utils.fail(f"{path} line {number} is not JSON")
            if isinstance(record, dict) and "epoch" in record and not record.get("eval_only"):
                records.append(record)
    if not records:
        utils.fail(f"{path} holds no per-epoch records")
    return records


def plot_curves(args):
    """One PNG of 2 x 2 panels (1000 x 700 pixels): each CURVES entry against epoch, one colour per run."""
    figure_module = utils.optional_import("matplotlib.figure", "matplotlib", "--curves")
    runs = [read_epochs(path) for path in args.curves]
    folders = [os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path) or ".") for path in args.curves]
    labels = [os.path.basename(folder) for folder in folders]
    if len(set(labels)) < len(labels):  # two runs in folders of the same name: their whole paths
        labels = folders
    figure = figure_module.Figure(figsize=(10, 7), dpi=100)
    for axes, (key, title) in zip(figure.subplots(2, 2).flat, CURVES):
        for i, (records, label) in enumerate(zip(runs, labels)):
            points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
            if points:
                axes.plot(*zip(*points), color=f"C{i % 10}", label=label, marker="." if len(points) < 50 else None)
            start = next((r["knn_acc1_init"] for r in records if r.get("knn_acc1_init") is not None), None)
            if key == "knn_acc1" and start is not None:
                axes.axhline(start, color=f"C{i % 10}", linestyle=":")
        if not axes.lines:
            axes.text(0.5, 0.5, f"no {key} in these logs", ha="center", va="center", transform=axes.transAxes)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("epoch")
        axes.locator_params(axis="x", integer=True)
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.tight_layout()
    output = args.output or os.path.join(args.output_dir, "curves.png")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    figure.savefig(output)
    print(f"wrote {output}")


def load_images(args):
    """(name, image (C, S, S) in its stored dtype) for each image file (PIL RGB for 3 channels, else
    data.decode_image), or for the first --synthetic-size synthetic images."""
    view = v2.Compose([v2.Resize(args.img_size, interpolation=v2.InterpolationMode.BICUBIC),
                       v2.CenterCrop(args.img_size), v2.PILToTensor()])
    if args.data == "synthetic":
        images = data.SyntheticImages(args.synthetic_size, args.img_size, in_chans=args.in_chans)
        return [(f"synthetic_{i}", view(images[i][0])) for i in range(len(images))]
    names = [os.path.splitext(os.path.basename(path))[0] for path in args.images]
    if len(set(names)) < len(names):
        utils.fail("two images have the same name; their pictures would overwrite each other")
    load = data.load_rgb if args.in_chans == 3 else lambda path: data.decode_image(path, in_chans=args.in_chans)
    return [(name, view(load(path))) for name, path in zip(names, args.images)]


def patch_attention(attention, grid):
    """Attention of the cls query (B, H, 1+N) -> (B, 1+H, h, w): each head's weights on the patches
    renormalised to sum to 1 (its weight on the cls token itself dropped), their mean first."""
    patches = attention[:, :, 1:]
    patches = patches / patches.sum(dim=-1, keepdim=True)
    maps = torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)  # (B, 1+H, N)
    return rearrange(maps, "b k (h w) -> b k h w", h=grid[0])


def token_pca(tokens, grid):
    """The first three principal components of one image's patch tokens (N, D), each in [0, 1], as RGB (3, h, w)."""
    centred = (tokens - tokens.mean(dim=0)).double()
    _, _, axes = torch.linalg.svd(centred, full_matrices=False)  # rows of axes: principal directions
    components = centred @ axes[:3].T  # (N, <=3)
    components = F.pad(components, (0, 3 - components.shape[1]))
    low, high = components.amin(dim=0), components.amax(dim=0)
    return rearrange(((components - low) / (high - low).clamp_min(1e-12)).float(), "(h w) c -> c h w", h=grid[0])


def picture(image, pca, maps, patch_size):
    """One row of panels, uint8 (3, S + 4, n * (S + 2) + 2): image (C, S, S; not RGB: the mean of its channels in
    grey), token PCA, mean attention, each head's."""
    low, high = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
    gray = ((maps - low) / (high - low).clamp_min(1e-12))[:, None].expand(-1, 3, -1, -1)  # (1+H, 3, h, w)
    panels = F.interpolate(torch.cat([pca[None], gray]), scale_factor=patch_size, mode="nearest")  # (2+H, 3, S, S)
    shown = data.normalize(image, (0.0,) * len(image), (1.0,) * len(image)).clamp(0, 1)  # (C, S, S) in [0, 1]
    shown = shown if len(shown) == 3 else shown.mean(0, keepdim=True).expand(3, -1, -1)  # other C: their mean, grey
    grid = make_grid(torch.cat([shown[None], panels]), nrow=len(panels) + 1, padding=2, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8)


@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    exports = [(flag, write) for flag, write in (("export_timm", export_timm), ("export_hf", export_hf),
                                                 ("export_onnx", export_onnx)) if getattr(args, flag) is not None]
    if exports:
        if args.pretrained is None:
            utils.fail(f"--{exports[0][0].replace('_', '-')} needs --pretrained")
        for _, write in exports:
            write(args)
        return
    if args.curves is not None:
        return plot_curves(args)
    if (args.data is None) == (not args.images):
        utils.fail("give image files or --data synthetic (one of the two)")
    if args.synthetic_size < 1:
        utils.fail(f"--synthetic-size must be at least 1, got {args.synthetic_size}")
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        utils.fail(f"image {missing[0]} does not exist")
    _, _, device = utils.init_distributed(args.device)
    encoder = models.VisionTransformer(img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans,
                                       **models.ARCHS[args.arch], ca_depth=args.ca_depth)
    data.load_pretrained_encoder(encoder, args.pretrained, args.branch)
    encoder.to(device).eval()
    utils.make_output_dir(args.output_dir)
    for name, image in load_images(args):
        x = data.normalize(image[None].to(device), args.mean, args.std)  # (1, C, S, S)
        tokens, attention = models.last_class_attention(encoder, x)  # (1, N, D), (1, H, 1+N)
        pca = token_pca(tokens[0].cpu(), encoder.grid_size)
        maps = patch_attention(attention.cpu(), encoder.grid_size)[0]
        path = os.path.join(args.output_dir, f"{name}_attention.png")
        to_pil_image(picture(image, pca, maps, args.patch_size)).save(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    utils.run_main(main)
