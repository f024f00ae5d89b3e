"""The config files: named arguments over one default row, the old positional spelling, each config's command."""
import re

import pytest

from vllama_jax.config import load_config, parse_arg


def test_parse_arg_names_positions_and_types():
    args = parse_arg("recipe=vision_stage2,steps=7,scan=true", positional=("llm",), llm="tiny",
                     recipe="vision_stage1", steps=1, scan=False, lr=0.5)
    assert dict(args) == {"llm": "tiny", "recipe": "vision_stage2", "steps": 7, "scan": True, "lr": 0.5}
    assert parse_arg("vicuna_7b,audio_stage1", positional=("llm", "recipe"), llm="", recipe="").recipe == "audio_stage1"
    with pytest.raises(ValueError, match="unknown name 'recipee'"):
        parse_arg("recipee=x", recipe="")
    with pytest.raises(ValueError, match="needs a name"):
        parse_arg("a,b", positional=("llm",), llm="")


def test_named_and_positional_spellings_give_the_same_config(repo_root):
    spec = repo_root / "configs/video_llama.py"
    named = load_config(f"{spec}:llm=vicuna_13b,recipe=audio_stage2")
    assert named.to_dict() == load_config(f"{spec}:vicuna_13b,audio_stage2").to_dict()
    assert named.train.branch == "audio" and named.model.equip_audio_branch and named.batch_size == 4
    with pytest.raises(ValueError, match="unknown recipe"):
        load_config(f"{spec}:recipe=stage3")
    with pytest.raises(ValueError, match="unknown llm"):
        load_config(f"{spec}:llm=gpt2")


def test_recipes_are_rows_over_the_default(repo_root):
    spec = repo_root / "configs/video_llama.py"
    stage1, audio1 = load_config(f"{spec}"), load_config(f"{spec}:recipe=audio_stage1")
    assert stage1.optimizer.warmup_steps == 2500 and audio1.optimizer.warmup_steps == 5000
    assert stage1.data.frame_sampling == audio1.data.frame_sampling == "uniform"  # written once, in the default row
    assert stage1.train.steps == 5 * 2500 and audio1.train.steps == 5 * 5000


def test_the_cpu_demo_is_its_own_experiment(repo_root):
    demo = load_config(str(repo_root / "configs/tiny_shapes.py"))
    assert demo.data.source == "shapes_world" and demo.eval.score == "shape_attributes" and "llm_pretraining" in demo
    av = load_config(str(repo_root / "configs/tiny_shapes.py:variant=audio_visual"))
    assert av.train.branch == "audio_visual" and av.data.audio_source == "fbank" and av.data.synthetic_sounds
    paper = load_config(str(repo_root / "configs/video_llama.py:llm=tiny"))
    assert paper.data.source == "shards" and "llm_pretraining" not in paper
    with pytest.raises(ValueError, match="unknown variant"):
        load_config(str(repo_root / "configs/tiny_shapes.py:variant=smell"))


@pytest.mark.parametrize("name", ["video_llama.py", "tiny_shapes.py"])
def test_every_config_docstring_gives_its_command(repo_root, name):
    text = (repo_root / "configs" / name).read_text()
    docstring = re.match(r'"""(.*?)"""', text, re.S).group(1)
    assert re.search(rf"vllama-train --config configs/{re.escape(name)}", docstring), docstring[:300]


def test_configs_pick_the_template_of_their_llm(repo_root):
    from vllama_jax.config import load_config

    spec = str(repo_root / "configs/video_llama.py")
    assert load_config(f"{spec}:llama2_13b_chat,vision_stage2").data.template == "llama_2"
    assert load_config(f"{spec}:vicuna_7b,audio_stage2").data.template == "vicuna"


def test_stage2_caption_prompts_are_the_alignment_prompts_in_the_llms_template(repo_root):
    from vllama_jax.config import load_config

    spec = str(repo_root / "configs/video_llama.py")
    vicuna = load_config(f"{spec}:vicuna_13b,vision_stage2").data
    assert vicuna.end_sym == "###" and len(vicuna.caption_prompts) == 4
    assert (
        vicuna.caption_prompts[0]
        == "###Human: <Image><ImageHere></Image> Describe this image in detail. ###Assistant: "
    )
    llama = load_config(f"{spec}:llama2_7b_chat,audio_stage2").data
    assert llama.end_sym == "</s>"
    assert llama.caption_prompts[0].startswith("[INST] <<SYS>>\n \n<</SYS>>\n\n<Image><ImageHere></Image> Describe")
    assert load_config(f"{spec}:vicuna_7b").data.caption_prompts == ()  # stage 1: no prompt, as the original
