"""PyTorch ShuffleNet v1/v2 timed like benchmarks/benchmark.py times ours (never imported by the
project or its tests: run by benchmark.py --torch=PYTHON from a separate PyTorch environment).

  python benchmarks/torch_shufflenet.py MODEL BATCH STEPS   ->  one JSON line on stdout
MODEL: v1_g3_1x | v1_g3_0.5x | v2_1x (same layouts as shufflenet_jax.models).
"""

import json
import resource
import sys
import time

import torch
from torch import nn

V1_CHANNELS = {"v1_g3_1x": (3, (24, 240, 480, 960)), "v1_g3_0.5x": (3, (12, 120, 240, 480)),
      "v1_g3_1x_noshuffle": (3, (24, 240, 480, 960))}


def shuffle(x, groups):
  n, c, h, w = x.shape
  return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def conv_bn(cin, cout, k, stride=1, groups=1, relu=True):
  layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]
  return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class V1Unit(nn.Module):
  def __init__(self, cin, cout, stride, groups, dense_first, use_shuffle):
    super().__init__()
    mid, out = cout // 4, (cout - cin if stride == 2 else cout)
    self.stride, self.groups, self.use_shuffle = stride, groups, use_shuffle
    self.compress = conv_bn(cin, mid, 1, groups=1 if dense_first else groups)
    self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid, relu=False)
    self.expand = conv_bn(mid, out, 1, groups=groups, relu=False)
    self.pool = nn.AvgPool2d(3, 2, 1)

  def forward(self, x):
    y = self.compress(x)
    if self.use_shuffle:
      y = shuffle(y, self.groups)
    y = self.expand(self.depthwise(y))
    if self.stride == 1:
      return torch.relu(x + y)
    return torch.relu(torch.cat([self.pool(x), y], 1))


class V1(nn.Module):
  def __init__(self, groups, channels, use_shuffle=True):
    super().__init__()
    self.stem = nn.Sequential(conv_bn(3, channels[0], 3, 2), nn.MaxPool2d(3, 2, 1))
    units, cin = [], channels[0]
    for s, (width, repeats) in enumerate(zip(channels[1:], (4, 8, 4))):
      for i in range(repeats):
        units.append(V1Unit(cin, width, 2 if i == 0 else 1, groups, s == 0 and i == 0,
                            use_shuffle))
        cin = width
    self.units = nn.Sequential(*units)
    self.fc = nn.Linear(cin, 1000)

  def forward(self, x):
    return self.fc(self.units(self.stem(x)).mean((2, 3)))


class V2Unit(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    b = cout // 2
    self.stride = stride
    if stride > 1:
      self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, cin, relu=False),
                                   conv_bn(cin, b, 1))
    self.branch2 = nn.Sequential(conv_bn(cin if stride > 1 else b, b, 1),
                                 conv_bn(b, b, 3, stride, b, relu=False), conv_bn(b, b, 1))

  def forward(self, x):
    if self.stride == 1:
      x1, x2 = x.chunk(2, 1)
      out = torch.cat([x1, self.branch2(x2)], 1)
    else:
      out = torch.cat([self.branch1(x), self.branch2(x)], 1)
    return shuffle(out, 2)


class V2(nn.Module):
  def __init__(self, channels=(24, 116, 232, 464, 1024)):
    super().__init__()
    self.stem = nn.Sequential(conv_bn(3, channels[0], 3, 2), nn.MaxPool2d(3, 2, 1))
    units, cin = [], channels[0]
    for width, repeats in zip(channels[1:4], (4, 8, 4)):
      for i in range(repeats):
        units.append(V2Unit(cin, width, 2 if i == 0 else 1))
        cin = width
    self.units = nn.Sequential(*units)
    self.conv5 = conv_bn(cin, channels[4], 1)
    self.fc = nn.Linear(channels[4], 1000)

  def forward(self, x):
    return self.fc(self.conv5(self.units(self.stem(x))).mean((2, 3)))


def build(name):
  if name == "v2_1x":
    return V2()
  groups, channels = V1_CHANNELS[name]
  return V1(groups, channels, use_shuffle="noshuffle" not in name)


def main():
  name, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  torch.manual_seed(0)
  model = build(name).to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
  x = torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
  y = torch.randint(0, 1000, (batch,))

  def train_step():
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

  model.train()
  train_step()  # warm-up
  start = time.perf_counter()
  for _ in range(steps):
    train_step()
  train_ips = batch * steps / (time.perf_counter() - start)
  model.eval()
  with torch.inference_mode():
    model(x)
    start = time.perf_counter()
    for _ in range(4 * steps):  # as many inference steps as benchmark.py times
      model(x)
    infer_ips = batch * 4 * steps / (time.perf_counter() - start)
    one = x[:1].contiguous(memory_format=torch.channels_last)
    model(one)
    latencies = []
    for _ in range(max(10, steps)):
      start = time.perf_counter()
      model(one)
      latencies.append(time.perf_counter() - start)
  latencies.sort()
  print(json.dumps({"framework": "pytorch", "torch": torch.__version__, "model": name,
                    "threads": torch.get_num_threads(), "train_img_per_s": train_ips,
                    "infer_img_per_s": infer_ips,
                    "latency_ms": 1000 * latencies[len(latencies) // 2],
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
  main()
