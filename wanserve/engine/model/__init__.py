"""What the model is, how it loads and where its weights live: the pipeline, the embedded
miniatures, the published layouts, random weights, expert offload and peak memory."""
