import copy

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from deltaft import TransferObjective, default_layers, replace_head
from deltaft.attention import estimate_channel_attention

torch.manual_seed(0)
source = torchvision.models.resnet18()  # use weights="IMAGENET1K_V1" for real work
data = TensorDataset(torch.randn(64, 3, 64, 64), torch.randint(0, 5, (64,)))
loader = DataLoader(data, batch_size=16, shuffle=True)

layers = default_layers(source)  # last block of each stage: layerN.1.conv2
attention = estimate_channel_attention(source, loader, layers, num_classes=5, epochs=1)
model = copy.deepcopy(source)
replace_head(model, num_classes=5)  # the new classifier, regularized by beta
objective = TransferObjective(model, source, "delta", attention=attention, alpha=0.01, beta=0.01)
optimizer = torch.optim.SGD(objective.param_groups(), lr=0.01, momentum=0.9)

objective.train()
for x, y in loader:
    out = objective(x, y)  # {"loss", "logits", "task_loss", "reg/delta", "reg/head"}
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    print({k: round(v.item(), 4) for k, v in out.items() if k != "logits"})
