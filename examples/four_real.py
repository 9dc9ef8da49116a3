"""4real: a 4D scene from a prompt. A video model makes 4Real's own two videos (a reference video with the scene
moving, and a freeze-time video with the camera moving and time frozen), structure from motion finds the cameras,
deformable Gaussians are fitted with video SDS -> a video with time moving -> a .splatv and per-frame .ply files.

    python examples/four_real.py --prompt "a corgi running on a beach"
    python examples/four_real.py --reference-video ref.mp4 --freeze-time-video freeze/ --canonical-index 8

Models (hub ids, fetched into the usual cache, or local directories): LTX-Video ``Lightricks/LTX-Video-0.9.5``
(--video-model: generates the videos and gives the SDS prior), X-CLIP ``microsoft/xclip-base-patch32``
(--xclip-model, for the metrics; skipped with a message when absent). On a GPU (an estimate, not measured here): about
24 GB of GPU memory, about an hour. On a CPU, not practical beyond tiny models. With tiny models, as
tests/test_examples.py runs it (its own 96 px videos of 17 frames, a tiny random LTX-Video and X-CLIP, 4 steps):
40 s on 2 quiet CPU cores, 40 s of CPU time: ns-train (structure from motion, the phases) 13 s, ns-render 9 s,
ns-4d-export splatv 9 s (its bake: 54.0 dB at worst against the model's renders, over the default --min-psnr 35) and
gaussians 8 s (each ns-* command spends about 6 s starting up and loading the run; at load average 6-9 the same took
423 s).
Outputs under --workdir (default examples_output/four_real): runs/, video.mp4, splatv/, gaussians/.
"""

import math
from pathlib import Path

import torch
from _common import orbit_path, parser, render, run, train

from ns_4d_methods.data.four_real_datamanager import load_inputs

VIDEO_MODEL = "Lightricks/LTX-Video-0.9.5"
XCLIP_MODEL = "microsoft/xclip-base-patch32"


def main() -> None:
    p = parser(__doc__, "four_real")
    p.add_argument("--prompt", default="three striped spheres bouncing on a tiled floor", help="the scene")
    p.add_argument("--video-model", default=VIDEO_MODEL, help="LTX-Video: hub id or local directory")
    p.add_argument("--xclip-model", default=XCLIP_MODEL, help="X-CLIP: hub id or local directory")
    p.add_argument("--reference-video", type=Path, help="your own reference video instead of a generated one")
    p.add_argument("--freeze-time-video", type=Path, help="your own freeze-time video (file or frame folder)")
    p.add_argument("--canonical-index", type=int, help="frame of the freeze-time video taken by the reference camera")
    args = p.parse_args()
    own = []
    if args.reference_video:
        own = ["--pipeline.reference-video", args.reference_video, "--pipeline.freeze-time-video",
               args.freeze_time_video, "--pipeline.freeze-time-canonical-index", args.canonical_index]
    config = train("4real", args.workdir, args.steps, "--pipeline.prompt", args.prompt, "--pipeline.video-model",
                   args.video_model, "--pipeline.xclip-model", args.xclip_model, *own, *args.train_args)
    # the reference camera held still while time runs from 0 to 1
    scene = load_inputs(config.parent)
    index = scene.freeze_indices.index(scene.canonical_index)
    c2w = torch.cat([scene.cameras.camera_to_worlds[index], torch.tensor([[0.0, 0.0, 0.0, 1.0]])]).numpy()
    size = int(scene.cameras.height[index])
    fov = math.degrees(2 * math.atan(0.5 * size / float(scene.cameras.fy[index])))
    render(config, orbit_path([c2w] * 9, fov, size, args.workdir / "camera_path.json"), args.workdir / "video.mp4")
    run("ns-4d-export", "splatv", "--load-config", config, "--output-dir", args.workdir / "splatv", *args.export_args)
    run("ns-4d-export", "gaussians", "--load-config", config, "--output-dir", args.workdir / "gaussians",
        "--num-frames", 5)


if __name__ == "__main__":
    main()
