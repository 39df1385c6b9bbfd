"""What main.py and the tools are made of: one concept per module, each the only home of its facts.

    options      the command line: every option with its rule, the rules between options, the YAML
                 config, the recipe values that depend on the run (lr per global batch, drop path)
    errors       the errors a user can cause (UserError and one class per kind): one line, exit 2
    device       the device table (NPU, CUDA, CPU), device and process-group setup, collectives
    amp          mixed precision as one Precision object (native autocast or apex)
    optim        optimizer, learning rate and schedule (timm's factories)
    data         the dataset: folder layout check, ImageFolder datasets, resumable sample order,
                 loaders, Mixup/CutMix and the training loss
    images       which files are images, how one decodes (load_rgb), the robust ImageFolder, and the
                 one evaluation preprocessing (also used by tools/predict.py and tools/export_onnx.py)
    checkpoint   the files of a run: run dir and its lock, output-dir checks, checkpoint names,
                 atomic writes, safe reading, finding the checkpoint to resume
    resume       where a run stops and continues: stop signals, recovery points, random states,
                 seeds, loading a checkpoint into the run (restore_training)
    engine       the loops: train_one_epoch, evaluate, fit (TrainingParts, TrainSettings) and the
                 guard against non-finite losses and weights
    reporting    log, progress bars, summary.csv, TensorBoard, curves.png and the results file,
                 all from one list of summary columns
    modelzoo     the ModelZoo summary and loss file from the results file (the launch scripts' report)
    launcher     the launch scripts' own options and their rules (test/common.sh evals its answer)
    inference    a ready-to-run model from any checkpoint file, for the tools
    step_profile time per kernel class of one training step (tools/benchmark.py, tools/gpu_report.py)

Importing `utils` imports none of them (launcher, modelzoo, errors and reporting need no torch).
"""

__all__ = ['options', 'errors', 'device', 'amp', 'optim', 'data', 'images', 'checkpoint', 'resume', 'engine',
           'reporting', 'modelzoo', 'launcher', 'inference', 'step_profile']
