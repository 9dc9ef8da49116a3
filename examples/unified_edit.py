"""unified-edit on the sample scene: data -> its training views edited by disentangled self-attention injection
and the scene (splatfacto-4d's deformable Gaussians) fitted to them -> a video -> per-frame 3DGS .ply files.

    python examples/unified_edit.py --prompt "three golden spheres"

Models (hub ids, fetched into the usual cache, or local directories): Stable Diffusion 2.1 base
``stabilityai/stable-diffusion-2-1-base`` (--sd-model), CLIP ``openai/clip-vit-large-patch14`` (--clip-model, for
the edit metrics; skipped with a message when absent). On a GPU (an estimate, not measured here): about 8 GB of GPU
memory at 512 px, about 40 minutes. On a CPU the edit takes hours (each view is inverted and regenerated). With tiny
models, as tests/test_examples.py runs it (a tiny random Stable Diffusion, 32 px, 10 training views, 2 inversion and
2 sampling steps, 3 training steps): 34 s on 2 quiet CPU cores, 38 s of CPU
time: ns-4d-sample-scene 3 s, ns-train (the edit and the fit) 14 s, ns-render of the 48-frame path 12 s,
ns-4d-export gaussians 10 s (each ns-* command spends about 6 s starting up and loading the run; at load average 7-9
the same took 291 s).
Outputs under --workdir (default examples_output/unified_edit): scene/, runs/, video.mp4, gaussians/.
"""

from _common import parser, render_sample_scene_video, run, sample_scene, train

SD_MODEL = "stabilityai/stable-diffusion-2-1-base"
CLIP_MODEL = "openai/clip-vit-large-patch14"


def main() -> None:
    p = parser(__doc__, "unified_edit")
    p.add_argument("--prompt", default="three golden spheres", help="what the edited scene shows")
    p.add_argument("--sd-model", default=SD_MODEL, help="Stable Diffusion: hub id or local directory")
    p.add_argument("--clip-model", default=CLIP_MODEL, help="CLIP for the edit metrics: hub id or local directory")
    args = p.parse_args()
    scene = sample_scene(args)
    config = train("unified-edit", args.workdir, args.steps, "--pipeline.prompt", args.prompt,
                   "--pipeline.editor.model", args.sd_model,
                   "--pipeline.clip-model", args.clip_model, *args.train_args, "--data", scene)
    render_sample_scene_video(config, args)
    run("ns-4d-export", "gaussians", "--load-config", config, "--output-dir", args.workdir / "gaussians",
        "--num-frames", 5, *args.export_args)


if __name__ == "__main__":
    main()
