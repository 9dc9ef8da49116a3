"""instruct4d on a reconstructed sample scene: data -> nerfacto-4d reconstruction -> the Instruct 4D-to-4D edit by
an instruction -> a video of the edited scene -> meshes.

    python examples/instruct4d.py --prompt "turn the spheres into gold"

Models (hub ids, fetched into the usual cache, or local directories): InstructPix2Pix ``timbrooks/instruct-pix2pix``
(--ip2p-model); RAFT optical flow, torchvision's ``Raft_Large_Weights.C_T_V1`` (into the torch hub cache; or
--train-args "--pipeline.raft-weights FILE", or "--pipeline.flow-backend dis" for OpenCV's weight-free flow); the
LPIPS loss's AlexNet, torchvision's ``AlexNet_Weights.IMAGENET1K_V1`` (into the torch hub cache; --train-args
"--pipeline.model.lpips-loss-weight 0" trains without it); CLIP ``openai/clip-vit-large-patch14`` for the edit
metrics (skipped with a message when absent). On a GPU (an estimate, not measured here): about 10 GB of GPU memory
for InstructPix2Pix at 512 px, the reconstruction about 15 minutes and the edit about an hour. On a CPU this is
hours (InstructPix2Pix takes minutes per frame). With tiny models, as tests/test_examples.py runs it (a tiny random
InstructPix2Pix, RAFT-small, 32 px, 10 training views, 4 + 3 steps, 2-step edits): 36 s on 2 quiet CPU cores, 40 s
of CPU time: ns-4d-sample-scene 2 s, the reconstruction 7 s, the edit 11 s, ns-render of the 48-frame path 13 s,
ns-4d-export mesh 8 s (each ns-* command spends about 6 s starting up and loading the run; at load average 7-8 the
same took 196 s). Outputs under --workdir (default examples_output/instruct4d): scene/, runs/, video.mp4, meshes/.
"""

import shlex

from _common import parser, render_sample_scene_video, run, sample_scene, train

IP2P_MODEL = "timbrooks/instruct-pix2pix"


def main() -> None:
    p = parser(__doc__, "instruct4d")
    p.add_argument("--prompt", default="turn the spheres into gold", help="the edit instruction")
    p.add_argument("--ip2p-model", default=IP2P_MODEL, help="InstructPix2Pix: hub id or local directory")
    p.add_argument("--recon-steps", type=int, default=None, help="steps of the nerfacto-4d reconstruction")
    p.add_argument("--recon-args", default=[], type=shlex.split, help="further flags of the reconstruction")
    args = p.parse_args()
    scene = sample_scene(args)
    recon = train("nerfacto-4d", args.workdir, args.recon_steps, *args.recon_args, "--data", scene)
    # the sample scene is in D-NeRF's layout: dnerf-data instead of instruct4d's default ns4d-data (a video's
    # transforms.json, whose frames follow one moving camera)
    config = train("instruct4d", args.workdir, args.steps, "--load-dir", recon.parent / "nerfstudio_models",
                   "--pipeline.prompt", args.prompt, "--pipeline.ip2p-model-id", args.ip2p_model, *args.train_args,
                   "--data", scene, "dnerf-data")
    render_sample_scene_video(config, args)
    run("ns-4d-export", "mesh", "--load-config", config, "--output-dir", args.workdir / "meshes", "--times", 0, 0.5,
        1, *args.export_args)


if __name__ == "__main__":
    main()
