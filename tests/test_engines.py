"""Scale-out through accelerate: the shipped accelerate configs parse with accelerate's (and
DeepSpeed's) own parsers, DeepSpeed and FSDP are refused where accelerate would silently run
DDP, and 2-process DDP runs (lora, qlora, a resume) give one process's per-step losses."""

import os
import subprocess
import sys
from unittest import mock

import pytest
from test_train import _env, _kill_script, losses_of

from tinylmm import api
from tinylmm.catalog import accelerate_configs
from tinylmm.errors import ConfigError
from tinylmm.train import engines

from conftest import TINY, tiny_stages

SHIPPED = {"ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero2-offload", "deepspeed-zero3", "deepspeed-zero3-offload"}


def launch_env(path) -> dict[str, str]:
    """The environment `accelerate launch --config_file path` gives the processes it starts,
    computed by accelerate's own launch code (its parser, checks and env preparation)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_the_shipped_configs_are_listed_and_copied(tmp_path):
    assert set(accelerate_configs.shipped()) == SHIPPED
    assert not SHIPPED & set(dict(api.listing("recipes")))  # `tinylmm cp NAME` is unambiguous
    rows = dict(api.listing("accelerate"))
    assert rows["fsdp2"].startswith("FSDP2") and rows["deepspeed-zero3-offload"].startswith("DeepSpeed ZeRO-3")
    kind, path = api.copy_shipped("fsdp2", tmp_path)
    assert kind == "accelerate config" and path.read_text() == accelerate_configs.shipped()["fsdp2"].read_text()
    with pytest.raises(FileExistsError, match="already exists"):
        api.copy_shipped("fsdp2", tmp_path)
    assert api.copy_shipped("base", tmp_path)[0] == "recipe"
    with pytest.raises(ConfigError, match="unknown recipe.* 'fsdp'.*did you mean 'fsdp2'"):
        api.copy_shipped("fsdp", tmp_path)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_config_parses_with_accelerate_and_deepspeed(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    path = accelerate_configs.shipped()[name]
    cfg = load_config_from_file(str(path))  # accelerate's ClusterConfig: unknown top-level keys are errors
    assert (cfg.num_machines, cfg.machine_rank, cfg.num_processes) == (1, 0, 2)
    # accelerate launch copies each key of deepspeed_config / fsdp_config onto its arguments
    # without checking it: a misspelt key would be silently ignored, so check them here.
    known = vars(launch_command_parser().parse_args(["train.py"]))
    for section in (cfg.deepspeed_config, cfg.fsdp_config):
        for key in section or {}:
            assert key in known, f"{path}: '{key}' is no accelerate launch setting"
    for field in ("num_machines", "machine_rank", "main_process_ip", "main_process_port", "same_network"):
        assert f"#   {field}:" in path.read_text(), field  # the multi-node fields, documented
    env = launch_env(path)
    with mock.patch.dict(os.environ, env):
        if cfg.distributed_type == DistributedType.DEEPSPEED:
            from deepspeed.runtime.config import DeepSpeedConfig

            ds = DeepSpeedPlugin().deepspeed_config  # accelerate's translation of the file
            stage = int(name[len("deepspeed-zero")])
            offload = "cpu" if name.endswith("-offload") else "none"
            # DeepSpeed's own parser (pydantic models), with the one value accelerate fills at prepare
            parsed = DeepSpeedConfig({**ds, "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2})
            assert parsed.zero_optimization_stage == stage
            assert parsed.zero_config.offload_optimizer.device == offload
            if stage == 3:
                assert parsed.zero_config.offload_param.device == offload
            assert engines.requested(env) == "deepspeed"
        elif cfg.distributed_type == DistributedType.FSDP:
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
            assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
            assert engines.requested(env) == "fsdp"
        else:
            assert cfg.distributed_type == DistributedType.MULTI_GPU and engines.requested(env) is None
    # on this machine (no CUDA) only the DDP file may run
    if engines.requested(env) is None:
        engines.refuse_where_it_cannot_run(cuda=False, accelerator=False, env=env)
    else:
        with pytest.raises(ConfigError, match="use the ddp config|Use the ddp config"):
            engines.refuse_where_it_cannot_run(cuda=False, accelerator=False, env=env)
        engines.refuse_where_it_cannot_run(cuda=True, accelerator=True, env=env)
        assert "not yet trained under it" in engines.not_run_yet(env)  # said on GPUs, at the start
    assert (engines.not_run_yet(env) is None) == (engines.requested(env) is None)


@pytest.mark.parametrize("name", ["deepspeed-zero3-offload", "fsdp2"])
def test_a_run_launched_with_deepspeed_or_fsdp_stops_before_building_without_a_gpu(tmp_path, name):
    """In the environment `accelerate launch --config_file NAME.yaml` sets (computed by
    accelerate's launch code above), on this machine without CUDA."""
    env = launch_env(accelerate_configs.shipped()[name])
    with mock.patch.dict(os.environ, env), mock.patch("tinylmm.train.loop.build_model") as build:
        with pytest.raises(ConfigError) as e:
            api.train_run(overrides=TINY, output_dir=str(tmp_path / "run"), evaluate=False)
    said = str(e.value)
    if name.startswith("deepspeed"):
        assert "asks for DeepSpeed (distributed_type: DEEPSPEED, zero_stage: 3, offload_optimizer_device: cpu)" in said
        assert "DeepSpeed needs CUDA GPUs: this machine has none" in said
    else:
        assert "asks for FSDP (distributed_type: FSDP, fsdp_version: 2)" in said and "plain DDP" in said
    assert "tinylmm cp ddp ." in said
    assert not build.called and not (tmp_path / "run").exists()  # nothing built, nothing written


def launch(port: int, *args, processes: int = 2):
    """`accelerate launch --config_file ddp.yaml ...` with a train entry point and its arguments."""
    ddp = accelerate_configs.shipped()["ddp"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ddp)]
    cmd += ["--num_processes", str(processes), "--main_process_port", str(port), *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def train_args(out, tune, overrides):
    return ["-m", "tinylmm.cli.app", "train", "--recipe", "base", "-o", out, "--no-eval", "--tune", tune, *overrides]


def one_process(out, tune, overrides):
    proc = subprocess.run(
        [sys.executable, *train_args(out, tune, overrides)], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_same_losses(a, b, tol=1e-4):
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 6
    for (stage, step, la), (_, _, lb) in zip(a, b):
        assert abs(la - lb) < tol, (stage, step, la, lb)


# Two stages (base: pretrain trains the connector, finetune the LLM through adapters), 3 steps
# each, 2 micro-batches per process per step: accumulation, DDP's all-reduce and adapters all run.
DDP = TINY + tiny_stages(("pretrain", "finetune"), steps=3, batch=8, micro=2) + ["lora.r=8", "lora.alpha=16"]


@pytest.mark.slow
def test_two_ddp_processes_match_one_under_qlora(tmp_path):
    """Through `tinylmm launch` with the shipped ddp.yaml, as the README launches it."""
    one_process(tmp_path / "one", "qlora", DDP)
    ddp = accelerate_configs.shipped()["ddp"]
    cmd = [sys.executable, "-m", "tinylmm.cli.app", "launch", "--config_file", str(ddp), "--main_process_port", "29542"]
    proc = subprocess.run(
        [*cmd, *train_args(tmp_path / "two", "qlora", DDP)[2:]], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes: 2" in proc.stderr and "(2 x 2 x 2 proc)" in proc.stderr and "4-bit nf4" in proc.stderr
    assert_same_losses(losses_of(tmp_path / "one"), losses_of(tmp_path / "two"))
    assert (tmp_path / "two" / "final" / "llm" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_two_ddp_processes_match_one_under_lora_and_resume_alike(tmp_path):
    """One process against two; then the 2-process run killed (SIGKILL) right after
    finetune's step-2 checkpoint and resumed with 2 processes gives the same losses."""
    overrides = DDP + ["stages.finetune.save_every=2"]
    one, ref, run = tmp_path / "one", tmp_path / "ref", tmp_path / "run"
    one_process(one, "lora", overrides)
    proc = launch(29543, *train_args(ref, "lora", overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes: 2" in proc.stderr
    assert_same_losses(losses_of(one), losses_of(ref))
    # both processes run the kill script: after the collective checkpoint each one SIGKILLs itself
    script = tmp_path / "kill.py"
    script.write_text(
        _kill_script(run, overrides, "finetune", 2, "lora").replace(
            "train_run(overrides=", "train_run(recipe='base', overrides="
        )
    )
    proc = launch(29544, script)
    assert proc.returncode != 0
    assert (run / "finetune" / "step-000002").exists() and not (run / "finetune" / "final").exists()
    proc = launch(29545, "-m", "tinylmm.cli.app", "train", "--resume", run, "--no-eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "processes: 2" in proc.stderr
    assert losses_of(run) == losses_of(ref)  # exactly: the same two processes, the same draws


def qlora_model(tmp_path, extra=(), env=None):
    """The tiny model through the base recipe's stages under --tune qlora, in accelerate
    launch's environment `env`; -> the model, a batch, the 4-bit layers and the finetune notes."""
    import bitsandbytes as bnb
    import torch
    from PIL import Image

    from tinylmm.config import resolve
    from tinylmm.models.assemble import build_model
    from tinylmm.train.stages import prepare_stage

    from conftest import model_inputs

    overrides = TINY + tiny_stages(("pretrain", "finetune")) + ["lora.r=8", "lora.alpha=16", *extra]
    cfg, _ = resolve("toy", "base", overrides, tune="qlora", output_dir=str(tmp_path))
    torch.manual_seed(0)
    model, processor = build_model(cfg.model)
    with mock.patch.dict(os.environ, env or {}):
        for name in cfg.stages:
            _, notes = prepare_stage(model, cfg, name, tmp_path)
    enc = processor.encode([("human", "<image>\nWhat color is the circle?"), ("gpt", "red")], num_images=1)
    x = model_inputs(processor, enc, Image.new("RGB", (32, 32), (200, 20, 20)))
    layers = [m for m in model.llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return model, x, layers, notes


def test_qlora_under_fsdp_stores_the_4bit_weights_in_the_compute_dtype(tmp_path):
    import torch

    from tinylmm.models.adapters import bnb_config
    from tinylmm.schema import QuantSpec

    plain, x, layers, notes = qlora_model(tmp_path / "plain")
    assert {m.weight.dtype for m in layers} == {torch.uint8} and "stored as uint8" in notes[0]
    env = launch_env(accelerate_configs.shipped()["fsdp2"])  # what accelerate launch sets for fsdp2.yaml
    sharded, _, layers, notes = qlora_model(tmp_path / "fsdp", env=env)
    assert {m.weight.dtype for m in layers} == {torch.bfloat16} == {m.weight.quant_storage for m in layers}
    assert "compute bf16, stored as bfloat16" in notes[0]
    # the same 4-bit values in another container: the same loss and gradients on this CPU
    losses = []
    for model in (plain, sharded):
        model.eval()  # no dropout draws: the two models share their seeded init, not the later draws
        loss = model(**x).loss_sum
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        losses.append((float(loss.detach()), grads))
    assert losses[0][0] == losses[1][0]
    assert losses[0][1].keys() == losses[1][1].keys()
    assert all(torch.equal(g, losses[1][1][n]) for n, g in losses[0][1].items())
    # an explicit quant.storage_dtype reaches BitsAndBytesConfig, FSDP or not
    assert bnb_config(QuantSpec(storage_dtype="fp16")).bnb_4bit_quant_storage == torch.float16
    assert bnb_config(QuantSpec(compute_dtype="fp32"), sharded=True).bnb_4bit_quant_storage == torch.float32
    *_, layers, _ = qlora_model(tmp_path / "fp32", extra=["quant.storage_dtype=fp32"])
    assert {m.weight.dtype for m in layers} == {torch.float32}
    with pytest.raises(ConfigError, match="quant.storage_dtype=bf16 stores 4-bit weights; quant.bits=8"):
        qlora_model(tmp_path / "int8", extra=["quant.bits=8", "quant.storage_dtype=bf16"])


@pytest.mark.parametrize("tune", [None, "lora"])
def test_fsdp_auto_wrap_finds_the_decoder_and_encoder_layers(tmp_path, tune):
    """accelerate's FSDP2 policy (TRANSFORMER_BASED_WRAP, fsdp2.yaml) reads the model's
    `_no_split_modules`; each name must be a class it finds in the model, under adapters too."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.dataclasses import get_module_class_from_name
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from tinylmm.config import resolve
    from tinylmm.models.assemble import build_model
    from tinylmm.train.stages import prepare_stage

    overrides = TINY + tiny_stages(("pretrain", "finetune")) + ["lora.r=8", "lora.alpha=16"]
    cfg, _ = resolve("toy", "base", overrides, tune=tune, output_dir=str(tmp_path))
    model, _ = build_model(cfg.model)
    for name in cfg.stages:
        prepare_stage(model, cfg, name, tmp_path)
    assert model._no_split_modules == ["LlamaDecoderLayer", "SiglipEncoderLayer"]
    assert all(get_module_class_from_name(model, n) is not None for n in model._no_split_modules)
    with mock.patch.dict(os.environ, launch_env(accelerate_configs.shipped()["fsdp2"])):
        policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), model)
    wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
    # the tower's blocks up to its feature layer (-2: 3 of the 4), then the LLM's 2 layers
    assert wrapped == ["SiglipEncoderLayer"] * 3 + ["LlamaDecoderLayer"] * 2
