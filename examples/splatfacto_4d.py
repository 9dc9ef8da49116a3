"""splatfacto-4d on the sample scene: data -> ns-train -> a video with camera and time moving -> per-frame 3DGS
.ply files and a .splatv for splaTV's web viewer.

    python examples/splatfacto_4d.py                 # CPU: 3,000-step compact preset, 4 min of training on 2 cores
    python examples/splatfacto_4d.py --steps 200     # a quick look (about 30 s of training)

With tiny settings, as tests/test_examples.py runs it (32 px, 10 training views, 5 steps): 33 s on 2 quiet CPU
cores, 38 s of CPU time: ns-4d-sample-scene 2 s, ns-train 8 s, ns-render of the 48-frame path 10 s, ns-4d-export
gaussians 7 s, splatv 12 s (each ns-* command spends about 6 s starting up and loading the run; on cores shared with
other jobs, at load average 10, the same took 267 s and 127 s of CPU, torch's threads spinning). 5 steps leave the
10,000 starting Gaussians faint (opacity 0.1) and overlapping, where the splatv copies' opacity ripple shows: the
bake reaches 32.6 dB at worst against the MLP renders (35.8 mean), under splatv's default --min-psnr 35, so that run
is refused unless it passes --export-args "--min-psnr 30" (as the test does). ns_4d_methods/export/splatv.py
measured 36.9 dB at worst with Gaussians fitted to the sample scene's motion; the default 3,000-step run of this
script was not exported here.

On a GPU (CUDA; an estimate, not measured here) the full 40,000-step schedule runs (about 2 GB of GPU memory at 128
px). Outputs under --workdir
(default examples_output/splatfacto_4d): scene/, runs/, video.mp4, gaussians/ (index.json + frame_*.ply),
splatv/scene.splatv. ns-4d-export splatv refuses (one line, nothing written) when the bake is further from the
model than its limits (--export-args "--min-psnr 30 --segments 16" to change them).
"""

from _common import parser, render_sample_scene_video, run, sample_scene, train


def main() -> None:
    args = parser(__doc__, "splatfacto_4d").parse_args()
    scene = sample_scene(args)
    config = train("splatfacto-4d", args.workdir, args.steps, *args.train_args, "--data", scene)
    render_sample_scene_video(config, args)
    run("ns-4d-export", "gaussians", "--load-config", config, "--output-dir", args.workdir / "gaussians",
        "--num-frames", 5)
    run("ns-4d-export", "splatv", "--load-config", config, "--output-dir", args.workdir / "splatv",
        *args.export_args)


if __name__ == "__main__":
    main()
