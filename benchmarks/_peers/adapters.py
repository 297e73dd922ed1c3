"""One adapter per library: build the workload's MMoE, train one epoch and score, through its public API.

Each adapter converts the shared :class:`~mtrank.data.TensorData` into the library's own input format in
``prepare`` (outside the timings); ``train_epoch`` then calls the library's training entry point:

* mtrank: ``Trainer(model, TrainConfig(...)).fit(train)`` (one Trainer, so the optimizer lives on);
* DeepCTR-Torch: ``deepctr_torch.models.MMOE``, ``model.compile("adam", ...)``,
  ``model.fit(x, y, epochs=1)``;
* torch-rechub: ``torch_rechub.models.multi_task.MMOE``, ``MTLTrainer.train_one_epoch(loader)`` (the loop
  that ``MTLTrainer.fit`` runs per epoch, without its validation pass and ``torch.save``), the loader from
  ``torch_rechub.utils.data.DataGenerator``.

Scoring: mtrank ``model.predict``; DeepCTR ``model.predict(x, batch_size)``; torch-rechub
``MTLTrainer.predict(model, DataLoader)``.

Architecture parity (peers.py prints the parameter counts): experts, towers and embeddings have the same
widths in all three. Differences the peers' public APIs impose: DeepCTR's gates have no bias (mtrank's have
8 per task); torch-rechub puts a BatchNorm1d after every hidden linear layer of experts, towers and gates.
Losses: mean BCE / MSE per task in mtrank and rechub; DeepCTR sums over the batch (its API). All use
Adam(lr=1e-3), no weight decay.
"""

from __future__ import annotations

import os
import sys
import tempfile
import types

import numpy as np
import torch

from mtrank.config import TrainConfig
from mtrank.data import TensorData
from mtrank.model import MultiTaskModel

os.environ.setdefault("TQDM_DISABLE", "1")  # rechub's trainer always draws progress bars


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class MtrankAdapter:
    name = "mtrank"

    cuda_graphs: bool | None = None  # None: the Trainer's automatic choice (a CUDA graph on the GPU)

    def __init__(self, workload, device: str = "cpu", precision: str = "fp32", seed: int = 0) -> None:
        from mtrank.train import Trainer

        self.device = torch.device(device)
        self.model = MultiTaskModel(workload.model_config(), seed=seed)
        self.config = TrainConfig(
            lr=1e-3,
            batch_size=workload.batch_size,
            epochs=1,
            precision=precision,
            device=device,
            progress=False,
            seed=seed,
        )
        self.trainer = Trainer(self.model, self.config, cuda_graphs=self.cuda_graphs)

    def prepare(self, data: TensorData):
        return data.to(self.device)  # the whole split on the training device (GPU when training there)

    def train_epoch(self, data: TensorData) -> None:
        self.trainer.fit(data)

    def predict(self, data: TensorData) -> np.ndarray:
        return self.model.predict(data.dense, data.sparse).cpu().numpy()

    def parameters(self) -> int:
        return count_parameters(self.model)


class MtrankEagerAdapter(MtrankAdapter):
    """mtrank with the eager step forced (on the GPU: without the CUDA graph), to show what the graph buys."""

    name = "mtrank-eager"
    cuda_graphs = False


def _import_deepctr_offline() -> None:
    """Import deepctr_torch without its import-time version check, a thread that GETs PyPI's JSON API.

    deepctr_torch imports ``requests`` (an undeclared dependency) only for that check; a stand-in whose
    ``get``
    fails makes the check print its "check manually" line and touch no network.
    """
    if "deepctr_torch" in sys.modules:
        return
    real = sys.modules.get("requests")
    stand_in = types.ModuleType("requests")

    def offline_get(*args, **kwargs):
        raise OSError("mtrank benchmark: no network")

    stand_in.get = offline_get
    sys.modules["requests"] = stand_in
    try:
        import deepctr_torch  # noqa: F401
    finally:
        if real is None:
            del sys.modules["requests"]
        else:
            sys.modules["requests"] = real


class DeepCTRAdapter:
    name = "deepctr"

    def __init__(self, workload, device: str = "cpu", precision: str = "fp32", seed: int = 0) -> None:
        _import_deepctr_offline()
        from deepctr_torch.inputs import DenseFeat, SparseFeat
        from deepctr_torch.models import MMOE

        torch.manual_seed(seed)
        self.workload = workload
        columns = [
            SparseFeat(f"c{i}", v, embedding_dim=workload.embedding_dim) for i, v in enumerate(workload.vocab_sizes)
        ]
        columns.append(DenseFeat("dense", workload.num_dense))
        self.names = [c.name for c in columns]
        self.model = MMOE(
            columns,
            num_experts=workload.num_experts,
            expert_dnn_hidden_units=tuple(workload.expert_hidden),
            gate_dnn_hidden_units=(),  # the paper's linear gate
            tower_dnn_hidden_units=tuple(workload.tower_hidden),
            l2_reg_linear=0.0,
            l2_reg_embedding=0.0,  # mtrank trains without weight decay too
            task_types=list(workload.task_types),
            task_names=[f"t{k}" for k in range(len(workload.task_types))],
            device="cuda:0" if device == "cuda" else "cpu",
            seed=seed,
        )
        loss = ["binary_crossentropy" if t == "binary" else "mse" for t in workload.task_types]
        self.model.compile("adam", loss=loss)

    def prepare(self, data: TensorData):
        x = {f"c{i}": data.sparse[:, i].numpy() for i in range(data.sparse.shape[1])}
        x["dense"] = data.dense.numpy()
        return x, data.labels.numpy()

    def train_epoch(self, native) -> None:
        x, y = native
        self.model.fit(dict(x), y, batch_size=self.workload.batch_size, epochs=1, verbose=0)

    def predict(self, native) -> np.ndarray:
        x, _ = native
        return self.model.predict(dict(x), batch_size=max(len(native[1]), 1))

    def parameters(self) -> int:
        return count_parameters(self.model)


class RechubAdapter:
    name = "rechub"

    def __init__(self, workload, device: str = "cpu", precision: str = "fp32", seed: int = 0) -> None:
        from torch_rechub.basic.features import DenseFeature, SparseFeature
        from torch_rechub.models.multi_task import MMOE
        from torch_rechub.trainers import MTLTrainer

        torch.manual_seed(seed)
        self.workload = workload
        features = [
            SparseFeature(f"c{i}", v, embed_dim=workload.embedding_dim) for i, v in enumerate(workload.vocab_sizes)
        ]
        features.append(DenseFeature("dense", embed_dim=workload.num_dense))  # one vector-valued dense feature
        task_types = ["classification" if t == "binary" else "regression" for t in workload.task_types]
        self.model = MMOE(
            features,
            task_types,
            n_expert=workload.num_experts,
            expert_params={"dims": list(workload.expert_hidden)},
            tower_params_list=[{"dims": list(workload.tower_hidden)} for _ in task_types],
        )
        self._dir = tempfile.TemporaryDirectory()
        self.trainer = MTLTrainer(
            self.model,
            task_types=task_types,
            optimizer_params={"lr": 1e-3, "weight_decay": 0.0},
            n_epoch=1,
            device="cuda:0" if device == "cuda" else "cpu",
            model_path=self._dir.name,
        )

    def prepare(self, data: TensorData):
        x = {f"c{i}": data.sparse[:, i].numpy() for i in range(data.sparse.shape[1])}
        x["dense"] = data.dense.numpy()
        return x, data.labels.numpy()

    def train_epoch(self, native) -> None:
        from torch_rechub.utils.data import DataGenerator

        x, y = native
        loader, _, _ = DataGenerator(x, y).generate_dataloader(x, y, x, y, batch_size=self.workload.batch_size)
        self.trainer.train_one_epoch(loader)

    def predict(self, native) -> np.ndarray:
        from torch.utils.data import DataLoader
        from torch_rechub.utils.data import PredictDataset

        x, y = native
        loader = DataLoader(PredictDataset(x), batch_size=max(len(y), 1), shuffle=False)
        return np.asarray(self.trainer.predict(self.model, loader))

    def parameters(self) -> int:
        return count_parameters(self.model)


ADAPTERS = {
    "mtrank": MtrankAdapter,
    "mtrank-eager": MtrankEagerAdapter,
    "deepctr": DeepCTRAdapter,
    "rechub": RechubAdapter,
}
