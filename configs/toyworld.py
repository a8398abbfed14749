"""The default: erase "circle" from the shipped small-world SD stack, then report what changed.

    coerase erase --out out/toyworld          # references, text stage, Co-Erasing stage, report

The report (``out/toyworld/report.json`` + ``grid.png``) compares the original model, the text
stage alone (ESD at half the budget; the equal-budget comparison is ``coerase frontier``) and the
full Co-Erasing run on prompts naming circles, on paraphrases that never say "circle", and on
every other shape.
"""

from coerase_jax.configuration import base_config
from coerase_jax.toyworld import world


def get_config():
    config = base_config(source="toyworld")
    config.sample.prompts = ("a red circle", "a blue square", "a green triangle", "a yellow disc")
    config.sample.steps = 25
    config.sample.guidance_scale = 3.0
    config.sample.batch_size = 64

    config.run_dir = "runs/toyworld"
    config.concept.name = "circle"
    # The concept named alone, as "nudity" is in SD, in the three templates the world's captions use:
    # a colour word in the concept prompt would be erased with the shape (every red thing with "a red
    # circle"). References: circles of every colour.
    config.concept.prompts = tuple(world.concept_prompts("circle"))  # "a circle", "a photo of a circle", ...
    config.concept.reference_prompts = tuple(world.named_prompts("circle"))  # "a red circle", ...
    config.data.num_references = 32
    config.data.reference_steps = 25
    config.data.reference_guidance = 3.0
    config.data.reference_batch_size = 32
    config.erase.ddim_steps = 25
    # 8 examples a step, not 4 (#18, dev seeds then test seeds): the same 400 iterations with twice
    # the examples per step hold the other shapes steadier across erasure seeds (test: -2.1 to -5.5
    # points over seeds 0-2, vs -2.3 to -9.0 at batch 4) and erase a little more.
    config.erase.batch_size = 8
    # Only the cross-attention K/V: gentler on the other shapes than esd-x or esd-u (see the #4 notes).
    config.text_stage.subset = config.image_stage.subset = "esd-x-strict"
    config.text_stage.steps = config.image_stage.steps = 200
    # Chosen on the dev seeds from the frontier at 400 iterations (issue #18 note): the paper's recipe,
    # 200 text steps then 200 image steps. Over three erasure seeds (batch 4) it left circles in 12 %
    # of named and 7 % of paraphrase images for 3.3 points of the other shapes; text 4e-4 / image 5e-4
    # erased more (8 % / 6 %) but cost 6 points, and text-only points of as low rates cost 7-9. At
    # batch 8 (dev): 8.9 % / 5.2 % for 2.0 points.
    config.text_stage.learning_rate = 2e-4
    config.image_stage.learning_rate = 4e-4
    config.checkpoint.every = 100
    config.log.every = 10

    config.report.kind = "toyworld"
    config.report.steps = 25
    config.report.guidance_scale = 3.0

    # `coerase eval`: the judging prompts and sampler settings above, so it reproduces report.json.
    config.eval.steps = config.report.steps
    config.eval.guidance_scale = config.report.guidance_scale
    config.eval.batch_size = 64
    return config
