"""A zoo of tiny plain-PyTorch models (no torchvision) covering the structures that structured
pruning must trace: BatchNorm chains, residual additions, bottlenecks, depthwise convs, inverted
residuals with squeeze-excitation gating, concatenation, flatten -> Linear, nn.MultiheadAttention,
hand-written qkv attention, an LSTM, chunk/GLU gates, and a forward with Python control flow that
torch.fx cannot trace. Sizes are tiny so that tests stay fast.

``ZOO`` maps a name to ``(constructor, example_inputs_maker)``, and so does ``CAUSES`` for one small
model per cause the zoo sweep of real architectures found; `build(name)` (either) returns a seeded
model in eval mode with non-trivial BatchNorm statistics, and its example inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VGG(nn.Module):
    """Conv-BN-ReLU stacks, max pooling, flatten -> Linear (each channel owns H*W features)."""

    def __init__(self, widths=(8, 16, 16), classes=10):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A stem, residual stages and a linear head; ``block`` is BasicBlock or Bottleneck."""

    def __init__(self, block=BasicBlock, widths=(8, 16), blocks=(2, 2), classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        stages, cin = [], 8
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                b = block(cin, w, stride=2 if (i > 0 and j == 0) else 1)
                stages.append(b)
                cin = w * getattr(block, "expansion", 1)
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class SqueezeExcite(nn.Module):
    """Channel gating: x * sigmoid(fc2(relu(fc1(mean(x)))))."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, se=False):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers = [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True)]
        if se:
            layers.append(SqueezeExcite(hidden, max(2, hidden // 4)))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """Depthwise separable inverted residuals (one with squeeze-excitation), residual adds."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, 2),
            InvertedResidual(8, 12, 2, 3, se=True),
            InvertedResidual(12, 12, 1, 3),
        )
        self.head = nn.Sequential(nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        self.classifier = nn.Linear(32, classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Inception(nn.Module):
    def __init__(self, cin, c1, c3, cp):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(cin, c1, 1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(cin, c3, 1), nn.ReLU(), nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU())
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, cp, 1), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.bp(x)], 1)


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat((x, self.conv(F.relu(self.bn(x)))), dim=1)


class ConcatNet(nn.Module):
    """Inception branches concatenated, then DenseNet layers that concatenate onto their input."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.inception = Inception(8, 4, 6, 4)
        self.dense = nn.Sequential(DenseLayer(14, 6), DenseLayer(20, 6))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(26 * 4, classes)

    def forward(self, x):
        x = self.dense(self.inception(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


class MLP(nn.Module):
    def __init__(self, sizes=(16, 32, 24, 4)):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class MLPBlock(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Patch embedding, class token, positional embedding, nn.MultiheadAttention blocks."""

    def __init__(self, dim=16, heads=4, hidden=32, depth=2, classes=10, image=16, patch=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class QKVAttention(nn.Module):
    """Hand-written multi-head attention with one fused qkv projection (timm style)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * self.head_dim)
        self.proj = nn.Linear(num_heads * self.head_dim, dim)

    def forward(self, x):
        B, N = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(out)


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = QKVAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerEncoder(nn.Module):
    """Token embedding + learned positions, hand-written qkv attention blocks, mean pooling."""

    def __init__(self, vocab=50, dim=16, heads=4, hidden=32, depth=2, length=8, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class LSTMClassifier(nn.Module):
    """Embedding -> Linear -> LSTM -> two Linear layers on the last step."""

    def __init__(self, vocab=50, emb=16, proj=24, hidden=32, mid=16, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.proj = nn.Linear(emb, proj)
        self.lstm = nn.LSTM(proj, hidden, batch_first=True)
        self.fc1 = nn.Linear(hidden, mid)
        self.fc2 = nn.Linear(mid, classes)

    def forward(self, tokens):
        out, _ = self.lstm(torch.relu(self.proj(self.embed(tokens))))
        return self.fc2(torch.relu(self.fc1(out[:, -1])))


class GLUNet(nn.Module):
    """Chunked channels: a GLU gate ``a, b = conv(x).chunk(2, 1); a * sigmoid(b)``, the two halves of
    a feature map sent to different branches, and ``F.glu`` on a Linear's outputs."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.left = nn.Conv2d(6, 6, 1)
        self.right = nn.Conv2d(6, 4, 3, padding=1)
        self.proj = nn.Linear(10, 12)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        a, b = self.bn1(self.conv1(x)).chunk(2, dim=1)
        h = a * torch.sigmoid(b)
        p, q = torch.chunk(F.relu(self.conv2(h)), 2, 1)
        h = torch.cat([self.left(p), self.right(q)], 1)
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.fc(F.glu(self.proj(h), dim=-1))


class DynamicNet(nn.Module):
    """Python control flow in the model's own forward, which torch.fx cannot trace: a branch on a
    tensor value, a loop whose count comes from the data, and a read of the batch size."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = BasicBlock(8, 8)
        self.gate = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = self.stem(x)
        if h.sum() > 0:
            h = self.block(h)
        for _ in range(1 + int(x.abs().sum() > 1)):
            h = h * torch.sigmoid(self.gate(h))
        batch = h.shape[0]
        return self.fc(h.flatten(2).mean(-1).reshape(batch, -1))


def _image(batch=2):
    return (torch.randn(batch, 3, 16, 16),)


def _tokens(batch=2):
    return (torch.randint(0, 50, (batch, 8)),)


def _vector(batch=2):
    return (torch.randn(batch, 16),)


ZOO = {
    "vgg": (VGG, _image),
    "resnet_basic": (lambda: ResNet(BasicBlock, (8, 16), (2, 2)), _image),
    "resnet_bottleneck": (lambda: ResNet(Bottleneck, (4, 8), (2, 1)), _image),
    "mobilenetv2": (MobileNetV2, _image),
    "concat": (ConcatNet, _image),
    "mlp": (MLP, _vector),
    "vit": (ViT, _image),
    "transformer": (TransformerEncoder, _tokens),
    "lstm": (LSTMClassifier, _tokens),
    "glu": (GLUNet, _image),
    "dynamic": (DynamicNet, _image),
}


# ---------------------------------------------------------------------------------------------
# One small model per cause that benchmarks/bench_zoo.py's sweep of torchvision / timm / Hugging
# Face models found (issue 15); tests/test_bench_zoo.py runs the sweep's checks on them in CI.


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward calls F.batch_norm with its own
    parameters and buffers, then an activation."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return F.silu(x)


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's LayerNorm2d: F.layer_norm over the channels of an NCHW tensor, permuted."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, LayerNorm over channels-last, Linear expansion, layer scale, residual."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.permute(0, 3, 1, 2)


class TimmNorms(nn.Module):
    """Layers that call the functional op with their own parameters (timm's BatchNormAct2d,
    ConvNeXt's LayerNorm2d) and a ConvNeXt block with layer scale."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), BatchNormAct(16),
                                  nn.Conv2d(16, 16, 3, padding=1, bias=False), BatchNormAct(16))
        self.down = nn.Sequential(LayerNorm2d(16), nn.Conv2d(16, 24, 2, 2))
        self.block = ConvNeXtBlock(24)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        return self.fc(self.block(self.down(self.stem(x))).mean((2, 3)))


class GroupedBlock(nn.Module):
    """ResNeXt/RegNet: 1x1, grouped 3x3 with GroupNorm, 1x1, residual."""

    def __init__(self, dim=16, width=16, groups=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(dim, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.gn = nn.GroupNorm(groups, width)
        self.conv3, self.bn3 = nn.Conv2d(width, dim, 1, bias=False), nn.BatchNorm2d(dim)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.gn(self.conv2(h)))
        return F.relu(x + self.bn3(self.conv3(h)))


class GroupedNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(GroupedBlock(), GroupedBlock())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class AuxNet(nn.Module):
    """GoogLeNet / Inception v3: an auxiliary classifier that runs only in training."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(12, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, classes))
        self.body = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        h = self.stem(x)
        out = self.fc(self.body(h).mean((2, 3)))
        return (out, self.aux(h)) if self.training else out


class RelativeBiasAttention(nn.Module):
    """Swin / BEiT: a relative-position bias table read through an integer index buffer."""

    def __init__(self, dim=16, heads=4, tokens=16):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads) * 0.1)
        position = torch.arange(tokens)
        self.register_buffer("index", (position[:, None] - position[None, :] + tokens - 1).flatten())

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].reshape(n, n, -1).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5 + bias
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


class SwinLike(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.norm1, self.attn = nn.LayerNorm(16), RelativeBiasAttention()
        self.norm2, self.mlp = nn.LayerNorm(16), MLPBlock(16, 32)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class VersionedBatchNorm(nn.BatchNorm2d):
    """torchvision MNASNet's check: loading needs the state_dict's ``version`` metadata."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version", None) not in (1, 2):
            raise ValueError("version should be set to 1 or 2")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class Resampling(nn.Module):
    """F.pad, F.interpolate, F.normalize and addcmul over pruned channels, and a BatchNorm whose
    loading checks its version metadata."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1), VersionedBatchNorm(12)
        self.conv2 = nn.Conv2d(12, 12, 3)
        self.scale = nn.Parameter(torch.rand(1, 12, 1, 1) + 0.5)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.conv2(F.pad(h, (1, 1, 1, 1)))
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = torch.addcmul(h, h, self.scale, value=0.5)
        return self.fc(F.normalize(h.mean((2, 3)), dim=1))


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D's layout and forward (GPT-2's projections): a Linear with the
    weight stored (in, out), run as addmm."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"  # what the layer-type table keys it by (no import)


CAUSES = {
    "timm_norms": (TimmNorms, _image),
    "grouped": (GroupedNet, _image),
    "aux_branch": (AuxNet, _image),
    "relative_bias": (SwinLike, _image),
    "resampling": (Resampling, _image),
}


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Gives every norm layer non-trivial affine weights and running statistics, so that a test
    cannot pass because gamma = 1, beta = 0, mean = 0, var = 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def build(name: str, seed: int = 0, batch: int = 2):
    """A seeded model of the zoo in eval mode, and example inputs for it."""
    make, inputs = ZOO[name] if name in ZOO else CAUSES[name]
    torch.manual_seed(seed)
    model = make()
    randomize_norms(model, seed)
    return model.eval(), inputs(batch)
