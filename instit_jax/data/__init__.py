"""Training data: Inst-IT/LLaVA JSON -> conversations -> TFRecord shards -> Grain batches.

Modules (import them directly; this package imports nothing heavy):
- ``schema``: ``load_records``, ``load_image_annotations``, ``load_video_annotations``, ``load_llava_records``,
  ``svit_to_llava``, ``dump_json`` (byte-exact round trip), ``SchemaError``.
- ``annotations_to_llava``: ``annotations_to_llava(records, levels=..., seed=..., group_by=...)``, ``LEVELS``.
- ``records``: ``write_shards``, ``ShardedRecordSource``, ``TFRecordShard``, ``sample_features``,
  ``parse_sample``, ``verify_manifest``, ``RecordCorruptError``.
- ``build``: ``build(inputs, media_root, out, num_shards, ...)`` and the ``instit-build-data`` CLI.
- ``pipeline``: ``PipelineConfig``, ``pipeline_config_for(llava_cfg, ...)``, ``build_pipeline``,
  ``check_tokenizer``.
- ``archives``: ``safe_extract_zip``, ``prepare_manual_dir``.
"""
