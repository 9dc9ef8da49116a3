"""nerfacto-4d on the sample scene: data -> ns-train -> a video with camera and time moving -> a mesh at three times
(the 4D hash grid has no correspondence between times, so the meshes are separate; see ns-4d-export mesh).

    python examples/nerfacto_4d.py                   # CPU: nerfacto's 30,000 steps take hours on 2 cores
    python examples/nerfacto_4d.py --steps 2000      # a first look on a CPU (about 1.5 hours on 2 cores)

With tiny settings, as tests/test_examples.py runs it (32 px, 10 training views, 5 steps of a small hash grid, meshes
on a 16^3 grid): 22 s on 2 quiet CPU cores, 26 s of CPU time: ns-4d-sample-scene 2 s,
ns-train 7 s, ns-render of the 48-frame path 11 s, ns-4d-export mesh 6 s (each ns-* command spends about 6 s starting
up and loading the run; on cores shared with other jobs, at load average 11-16, the same took 265 s and 87 s of CPU).

On a GPU (CUDA, tiny-cuda-nn optional; an estimate, not measured here) 30,000 steps take about 15 minutes with about 4
GB of GPU memory. Outputs
under --workdir (default examples_output/nerfacto_4d): scene/, runs/, video.mp4, meshes/ (index.json + mesh_*.ply).
"""

from _common import parser, render_sample_scene_video, run, sample_scene, train


def main() -> None:
    args = parser(__doc__, "nerfacto_4d").parse_args()
    scene = sample_scene(args)
    config = train("nerfacto-4d", args.workdir, args.steps, *args.train_args, "--data", scene)
    render_sample_scene_video(config, args)
    run("ns-4d-export", "mesh", "--load-config", config, "--output-dir", args.workdir / "meshes", "--times", 0, 0.5,
        1, *args.export_args)


if __name__ == "__main__":
    main()
