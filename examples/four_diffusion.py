"""4diffusion on the sample object video: a monocular video of the moving spheres -> a 4D object (dynamic NeRF
distilled from the 4DM multi-view video prior) -> an orbit video with time moving -> meshes.

    python examples/four_diffusion.py --prior-model PATH_TO_4DM

Models: the 4DM prior in diffusers layout (--prior-model: a directory made by ``ns-4d-convert 4dm`` from 4Diffusion's
released checkpoint; see docs of ns-4d-convert), CLIP ``openai/clip-vit-large-patch14`` (--clip-model, for the
metrics), CLIPSeg ``CIDAS/clipseg-rd64-refined`` (--matting-model, mattes the anchor video), torchvision's VGG16
``VGG16_Weights.IMAGENET1K_V1`` in the torch hub cache (the anchor loss's LPIPS; --train-args
"--pipeline.model.anchor-lpips-weight 0" trains without it). On a GPU (an estimate, not measured here): about 24 GB
of GPU memory (4DM at 256 px, 4 views x 8 frames), about 2 hours for 4Diffusion's 10,000 steps. On a CPU, not
practical beyond tiny models. With tiny models, as tests/test_examples.py runs it (tiny random 4DM, CLIP, CLIPSeg and
VGG16, a 32 px object video, 3 steps, meshes on a 16^3 grid): 38 s on 2 quiet CPU cores (load
average below 1), 40 s of CPU time: ns-4d-sample-scene 3 s, ns-train 20 s (the anchor video, 3 steps, the closing
evaluation and orbit videos), ns-render 9 s, ns-4d-export mesh 8 s (each ns-* command spends about 6 s starting up and
loading the run; at load average 5-6 the same took 524 s).
Outputs under --workdir (default examples_output/four_diffusion): scene/object/, runs/, video.mp4, meshes/.
"""

from _common import orbit_path, parser, render, run, train

from ns_4d_methods.render.orbit_cameras import orbit_c2w

CLIP_MODEL = "openai/clip-vit-large-patch14"
MATTING_MODEL = "CIDAS/clipseg-rd64-refined"


def main() -> None:
    p = parser(__doc__, "four_diffusion")
    p.add_argument("--prior-model", required=True, help="4DM in diffusers layout (ns-4d-convert 4dm)")
    p.add_argument("--clip-model", default=CLIP_MODEL, help="CLIP: hub id or local directory")
    p.add_argument("--matting-model", default=MATTING_MODEL, help="CLIPSeg for the anchor video's mattes")
    p.add_argument("--prompt", default="three striped spheres", help="text for the prior's conditioning")
    args = p.parse_args()
    scene = args.workdir / "scene"
    if not scene.exists():
        run("ns-4d-sample-scene", scene, "--resolution", args.resolution, "--num-train", 2, "--num-val", 1,
            "--num-test", 1, "--num-points", 0, "--object-video")
    config = train("4diffusion", args.workdir, args.steps, "--pipeline.prompt", args.prompt,
                   "--pipeline.prior-model", args.prior_model, "--pipeline.clip-model", args.clip_model,
                   "--pipeline.matting-model", args.matting_model,
                   "--pipeline.gt-views", scene / "object" / "gt_views", *args.train_args,
                   "--data", scene / "object" / "frames")
    # an orbit in 4diffusion's convention (elevation, azimuth from the input view at -90 degrees, distance)
    c2ws = [orbit_c2w(0.0, azimuth, 1.1).numpy() for azimuth in range(-90, 271, 45)]
    render(config, orbit_path(c2ws, 45.0, args.resolution, args.workdir / "camera_path.json"),
           args.workdir / "video.mp4")
    run("ns-4d-export", "mesh", "--load-config", config, "--output-dir", args.workdir / "meshes", "--times", 0, 0.5,
        1, *args.export_args)


if __name__ == "__main__":
    main()
