"""torch.hub entry points: ExtreMA encoders in one call, ready for `tokens, instance = encoder(images)` (the patch
tokens (B, N, D) and the instance representation (B, D), both after the final norm; images normalised with the
checkpoint's mean and std, ImageNet's for the official ones).

    encoder = torch.hub.load("OWNER/REPO", "extrema", checkpoint="output/pretrain/checkpoint-last.pth")
    encoder = torch.hub.load("OWNER/REPO", "extrema_vitb16_mask08x5_color_1k")    # an official checkpoint

"extrema" takes any checkpoint, official or of this repository (a file, or an http(s):// or file:// URL downloaded
once into torch.hub's cache); one entry per official checkpoint downloads it the same way (pretrained=False: the
ViT-B/16 with random weights).
"""
import models

dependencies = ["torch", "einops"]

OFFICIAL_URL = "https://frontiers.blob.core.windows.net/pretraining/checkpoints/extrema/extrema_{}.pth"


def extrema(checkpoint, branch="momentum"):
    """The encoder of one branch ("momentum" or "online") of a checkpoint file or URL, its architecture read from
    the checkpoint, in evaluation mode."""
    return models.pretrained_encoder(models.load_checkpoint(checkpoint), branch)


def _official(name):
    """The entry of the official checkpoint extrema_<name>.pth."""
    def entry(pretrained=True, branch="momentum"):
        return extrema(OFFICIAL_URL.format(name), branch) if pretrained else models.vit_base().eval()

    entry.__doc__ = (f"ViT-B/16 encoder of the official checkpoint extrema_{name}.pth (pretrained=False: random "
                     f"weights); branch: momentum or online.")
    return entry


extrema_vitb16_mask08x5_1k = _official("mask08x5_1k_300ep")
extrema_vitb16_mask08x5_color_1k = _official("mask08x5_color_1k_300ep")
extrema_vitb16_mask09x8_color_1k = _official("mask09x8_color_1k_300ep")
extrema_vitb16_mask08x5_color_22k = _official("mask08x5_color_22k_30ep")
