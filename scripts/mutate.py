#!/usr/bin/env python3
"""Mutation run: plant one plausible bug at a time and check that the test suite catches it.

Each mutant below names a file, an exact snippet that must occur there once, and what it becomes.
The run copies the working tree (tracked and untracked-not-ignored files) and the virtual
environment into a scratch directory, installs the copy there (editable, so a Python mutant takes
effect at once; a C++ mutant rebuilds the extension), and for every mutant runs the tests most
likely to catch it first and, if they pass, the whole suite. A mutant is *killed* when a test
fails, *survives* when the whole suite passes. The list is kept in step with the code: a snippet
that no longer occurs exactly once is reported as stale and counts as a failure of the run.

    python scripts/mutate.py                  # every mutant; prints the score and the survivors
    python scripts/mutate.py --list           # the list, by area
    python scripts/mutate.py --check          # only check that every snippet still applies
    python scripts/mutate.py --only NAME,...  # some of them
    python scripts/mutate.py --baseline       # run the whole suite on the unmutated copy first

Not part of CI (it takes a while); run it before resolving an issue that changes the tests or the
code they guard, and record the score in bench/RESULTS.md. Exit status: 0 when every mutant was
killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "layerswap-fast" / "mutate"


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # run first; the whole suite runs only if these pass

    @property
    def is_cpp(self) -> bool:
        return self.file.startswith("csrc/")


def M(name: str, area: str, file: str, old: str, new: str, *tests: str) -> Mutant:
    return Mutant(name, area, file, old, new, tuple(tests))


MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------ planner and methods
    M("lower-transition-off-by-one", "planner", "layerswap_fast/methods/swap.py",
      "elif layer < b + lt:", "elif layer <= b + lt:", "tests/test_swap_plan.py"),
    M("ramp-weights-skip-the-ends", "planner", "layerswap_fast/methods/swap.py",
      "task_w = j / (n + 1)", "task_w = j / n", "tests/test_swap_plan.py"),
    M("non-layer-task-takes-language", "planner", "layerswap_fast/methods/swap.py",
      'if config.non_layer == "task":\n        return (Term(TASK, 1.0),)',
      'if config.non_layer == "task":\n        return (Term(LANGUAGE, 1.0),)', "tests/test_swap_plan.py"),
    M("copy-ignores-a-dtype-change", "planner", "layerswap_fast/plan/__init__.py",
      "and dtypes[terms[0].role][spec.name] == out_dtype):",
      "):", "tests/test_merge.py", "tests/test_swap_plan.py"),
    M("swap-may-exceed-the-layers", "planner", "layerswap_fast/methods/swap.py",
      "if needed > num_layers:", "if needed > num_layers + 1:", "tests/test_swap_plan.py"),
    M("soup-weights-not-normalised", "methods", "layerswap_fast/methods/common.py",
      "return tuple(w / total for w in ws)", "return tuple(ws)", "tests/test_baselines.py"),
    M("task-arithmetic-base-weight", "methods", "layerswap_fast/methods/task_arithmetic.py",
      "1.0 - len(experts) * lam", "1.0 - lam", "tests/test_baselines.py"),
    M("ties-k-from-numel-minus-one", "methods", "layerswap_fast/methods/ties.py",
      "return int(density * numel)", "return int(density * (numel - 1))",
      "tests/test_baselines.py"),
    M("revert-layer-range-past-the-end", "methods", "layerswap_fast/methods/revert.py",
      "if not 0 <= a <= b < num_layers:", "if not 0 <= a <= b <= num_layers:", "tests/test_baselines.py"),
    M("revert-layer-list-unchecked", "methods", "layerswap_fast/methods/revert.py",
      "if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:",
      "if isinstance(layer, bool) or not isinstance(layer, int):", "tests/test_baselines.py"),
    M("revert-row-threshold-inclusive", "methods", "layerswap_fast/engine/ops.py",
      'return mav < params["threshold"]', 'return mav <= params["threshold"]', "tests/test_baselines.py"),
    M("revert-fraction-rounds-up", "methods", "layerswap_fast/methods/revert.py",
      '(("count", int(config.row_fraction * rows)),)', '(("count", round(config.row_fraction * rows + 0.49)),)',
      "tests/test_baselines.py"),
    # ------------------------------------------------------------ validation of inputs
    M("tensor-size-not-checked", "validation", "layerswap_fast/formats/checkpoint.py",
      "if end - begin != expected:", "if end - begin > expected:", "tests/test_checkpoint.py"),
    M("gaps-between-tensors-accepted", "validation", "layerswap_fast/formats/checkpoint.py",
      "if begin != position:", "if begin < position:", "tests/test_checkpoint.py"),
    M("trailing-bytes-accepted", "validation", "layerswap_fast/formats/checkpoint.py",
      "if data_start + position != file_size:", "if data_start + position > file_size:",
      "tests/test_checkpoint.py"),
    M("unhashable-dtype-not-checked", "validation", "layerswap_fast/formats/checkpoint.py",
      "if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:", "if dtype not in DTYPE_SIZES:",
      "tests/test_fuzz.py"),
    M("overlapping-tensors-accepted", "validation", "layerswap_fast/formats/checkpoint.py",
      '            raise CheckpointError(f"{where}: tensor {name!r} at offset {begin} {kind} (expected {position})")',
      '            if begin > position:\n                raise CheckpointError(f"{where}: tensor {name!r} at offset {begin} {kind} (expected {position})")',
      "tests/test_fuzz.py", "tests/test_checkpoint.py"),
    M("tensor-in-two-shards-accepted", "validation", "layerswap_fast/formats/checkpoint.py",
      "                if spec.name in specs:\n", "                if spec.name in specs and False:\n",
      "tests/test_checkpoint.py"),
    M("index-may-omit-a-tensor", "validation", "layerswap_fast/formats/checkpoint.py",
      "        if name not in weight_map:\n", "        if name not in weight_map and False:\n",
      "tests/test_checkpoint.py"),
    M("index-may-leave-the-directory", "validation", "layerswap_fast/formats/checkpoint.py",
      'return ".." not in Path(relative).parts', "return True", "tests/test_checkpoint.py",
      "tests/test_hostile.py"),
    M("layer-index-unbounded", "validation", "layerswap_fast/plan/layers.py",
      "or int(digits) >= MAX_LAYERS:", "or int(digits) > 10 * MAX_LAYERS:", "tests/test_bad_input.py"),
    M("layer-count-not-checked-against-names", "validation", "layerswap_fast/plan/layers.py",
      "    if seen != set(range(count)):", "    if not seen <= set(range(count)):", "tests/test_layers.py"),
    M("json-depth-cap-off", "validation", "layerswap_fast/safe_read.py",
      "MAX_DEPTH = 64", "MAX_DEPTH = 100000", "tests/test_bad_input.py"),
    M("side-file-outside-the-checkpoint", "validation", "layerswap_fast/formats/side_files.py",
      "if not any(real == r or r in real.parents for r in roots):", "if False:", "tests/test_safety.py"),
    M("side-file-size-cap-off", "validation", "layerswap_fast/formats/side_files.py",
      "if st.st_size > MAX_BYTES:", "if st.st_size > 2 * MAX_BYTES:", "tests/test_safety.py"),
    # ------------------------------------------------------------ layout
    M("shard-limit-inclusive", "layout", "layerswap_fast/formats/layout.py",
      "if groups[-1] and (used + n > shard_size or", "if groups[-1] and (used + n >= shard_size or",
      "tests/test_merge.py"),
    M("shards-ignore-the-source-block-offset", "layout", "layerswap_fast/formats/layout.py",
      "or None not in (mine, phase) and mine != phase)", ")", "tests/test_merge.py", "tests/test_reuse.py"),
    M("layout-aligns-to-4k-on-any-filesystem", "layout", "layerswap_fast/writing.py",
      "block=layout_block(out))", "block=4096)", "tests/test_reuse.py"),
    M("space-check-ignores-clones", "output", "layerswap_fast/writing.py",
      'clones = None if write.dry_run or write.link == "copy" else', 'clones = None if True else',
      "tests/test_reuse.py"),
    M("tensor-digest-without-its-length", "checksum", "layerswap_fast/formats/digest.py",
      'self._outer.update(length.to_bytes(8, "little") + digest)', "self._outer.update(digest)",
      "tests/test_digest.py", "tests/test_merge.py"),
    M("copied-tensor-digest-never-cached", "checksum", "layerswap_fast/formats/writeback.py",
      "if self.cache is not None:\n                self.cache.put(key,", "if False:\n                self.cache.put(key,",
      "tests/test_digest.py"),
    M("device-blend-weights-reversed", "session", "layerswap_fast/engine/memory.py",
      "[t.weight for t in recipe.terms], flat)",
      "[t.weight for t in reversed(recipe.terms)], flat)", "tests/test_swap_session.py"),
    M("sweep-shares-across-experts", "sweep", "layerswap_fast/sweep_build.py",
      "tuple((source[t.role], t.weight) for t in recipe.terms)", "tuple((t.role, t.weight) for t in recipe.terms)",
      "tests/test_sweep.py"),
    M("sweep-never-releases", "sweep", "layerswap_fast/sweeps.py",
      "writeback.release(pair)  #", "pass  #", "tests/test_sweep.py"),
    M("sweep-drops-the-header", "sweep", "layerswap_fast/sweep_build.py",
      "header - header % mmap.PAGESIZE + mmap.PAGESIZE, 0,", "0, 0,", "tests/test_sweep.py"),
    M("unaligned-data-without-copies", "layout", "layerswap_fast/formats/layout.py",
      "pad = -(8 + len(raw)) % 8 if phase is None", "pad = 0 if phase is None", "tests/test_merge.py"),
    M("page-phase-may-be-unaligned", "layout", "layerswap_fast/formats/layout.py",
      "if phase % 8 == 0]", "if phase % 2 == 0]", "tests/test_merge.py"),
    M("index-total-size-counts-headers", "layout", "layerswap_fast/formats/layout.py",
      '"total_size": sum(s.data_size for s in shards)', '"total_size": sum(s.file_size for s in shards)',
      "tests/test_merge.py"),
    M("shard-reused-when-one-tensor-is-copied", "layout", "layerswap_fast/formats/layout.py",
      "if shard.names and all(copied_from.get(n) == role for n in shard.names)]",
      "if shard.names and any(copied_from.get(n) == role for n in shard.names)]", "tests/test_reuse.py"),
    # ------------------------------------------------------------ engine and publishing
    M("publish-renames-before-it-fsyncs", "publishing", "layerswap_fast/formats/output.py",
      "    if sync:\n        for entry in sorted(tmp.iterdir()):\n            fsync_path(entry)\n    fsync_path(tmp)\n",
      "", "tests/test_safety.py"),
    M("sync-ignored", "publishing", "layerswap_fast/writing.py",
      "threads=write.threads or 0, sync=write.sync,", "threads=write.threads or 0, sync=False,",
      "tests/test_safety.py"),
    M("publish-may-replace-a-new-directory", "publishing", "layerswap_fast/formats/output.py",
      "elif not rename(tmp, out, _RENAME_NOREPLACE):\n            rename(tmp, out)",
      "else:\n            rename(tmp, out)", "tests/test_safety.py", "tests/test_merge.py"),
    M("stale-partials-of-live-runs-removed", "publishing", "layerswap_fast/formats/output.py",
      "if pid.isdigit() and not _pid_alive(int(pid)):", "if pid.isdigit():", "tests/test_safety.py",
      "tests/test_merge.py"),
    M("input-changes-not-checked-at-the-end", "engine", "layerswap_fast/engine/execute.py",
      '            ckpt.check_unchanged("merge")\n', "            pass\n", "tests/test_safety.py"),
    M("copy-pieces-restart-at-the-tensor", "engine", "layerswap_fast/engine/execute.py",
      "writer.copy_range(src, src_offset + start, dst_offset + start, n)",
      "writer.copy_range(src, src_offset, dst_offset + start, n)", "tests/test_merge.py"),
    M("input-is-the-output", "engine", "layerswap_fast/formats/output.py",
      "    return a.parts[:n] == b.parts[:n]", "    return a == b", "tests/test_safety.py"),
    M("model-stock-dot-products-read-from-the-first-pairs-slot", "engine", "layerswap_fast/engine/mergekit_ops.py",
      "[sums[slots[pair]] for pair in pairs]", "[sums[slots[pairs[0]]] for pair in pairs]",
      "tests/test_mergekit_program.py::test_core_programs_write_the_numpy_steps_bytes"),
    M("sce-zero-variances-read-from-bin-1", "engine", "layerswap_fast/engine/mergekit_ops.py",
      "int(hists[0, 0] if zeros_in_bin_0", "int(hists[0, 1] if zeros_in_bin_0",
      "tests/test_mergekit_program.py::test_whole_tensor_sums_over_segments_write_the_numpy_steps_bytes"),
    M("ram-overlap-counts-one-model", "engine", "layerswap_fast/engine/mergekit_ops.py",
      "overlap = p.sign(p.maxk(p.addk(counts, -1.0), 0.0))", "overlap = p.sign(p.maxk(p.addk(counts, -0.5), 0.0))",
      "tests/test_mergekit_program.py::test_core_programs_write_the_numpy_steps_bytes"),
    M("multislerp-tangent-mean-unrounded", "engine", "layerswap_fast/engine/mergekit_ops.py",
      "        mean = p.round(p.divk(mean, center))\n        ts =", "        mean = p.divk(mean, center)\n        ts =",
      "tests/test_mergekit_program.py::test_core_programs_write_the_numpy_steps_bytes"),
    # ------------------------------------------------------------ recipes and verify
    M("recipe-drops-upper-transition", "recipes", "layerswap_fast/methods/swap.py",
      '"Blended layers below the top block.", default=1)',
      '"Blended layers below the top block.", default=1, recorded=False)', "tests/test_recipes.py"),
    M("recipe-drops-density", "recipes", "layerswap_fast/methods/ties.py",
      '"are all kept).", default=0.2)', '"are all kept).", default=0.2, recorded=False)', "tests/test_recipes.py"),
    M("recipe-drops-shard-size", "recipes", "layerswap_fast/writing.py",
      '{**options, "shard_size": str(write.shard_size)}', "options", "tests/test_recipes.py"),
    M("verify-skips-the-metadata-copies", "recipes", "layerswap_fast/formats/verify.py",
      "        _check_metadata_copies(ckpt, recipe, where)\n", "", "tests/test_safety.py", "tests/test_verify.py"),
    M("verify-accepts-extra-files", "recipes", "layerswap_fast/formats/verify.py",
      "if present != set(recorded):", "if not set(recorded) <= present:", "tests/test_safety.py",
      "tests/test_verify.py"),
    # ------------------------------------------------------------ CLI
    M("cli-errors-exit-1", "cli", "layerswap_fast/cli/__init__.py",
      'click.echo(f"error: {safe}", err=True)\n    sys.exit(2)', 'click.echo(f"error: {safe}", err=True)\n    sys.exit(1)',
      "tests/test_cli.py"),
    M("cli-error-lines-keep-newlines", "cli", "layerswap_fast/cli/__init__.py",
      'safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)', "safe = message",
      "tests/test_bad_input.py"),
    # ------------------------------------------------------------ analysis
    M("magnitude-weights-not-inverted", "analysis", "layerswap_fast/analysis/stats.py",
      "inv = {n: 1.0 / a for n, a in average_mavs.items()}", "inv = dict(average_mavs)", "tests/test_analysis.py"),
    M("heatmap-scale-left-at-the-placeholders", "analysis", "layerswap_fast/analysis/heatmap.py",
      "        self.norm.vmax = vmax\n", "", "tests/test_analysis.py"),
    M("heatmap-colorbar-left-in-the-background", "analysis", "layerswap_fast/analysis/heatmap.py",
      "        for artist in self._on_top + self._colorbar_parts():\n            artist.draw(renderer)",
      "        for artist in self._on_top:\n            artist.draw(renderer)", "tests/test_analysis.py"),
    M("heatmap-built-at-the-default-gil-interval", "analysis", "layerswap_fast/analysis/heatmap.py",
      "sys.setswitchinterval(min(_saved_interval, _GIL_SWITCH_S))", "pass", "tests/test_analysis.py"),
    # ------------------------------------------------------------ C++ kernels and I/O
    M("var-pop-unbiased-when-the-count-is-a-power-of-two", "core kernels", "csrc/mergekit_program.cpp",
      "  if ((nx & (nx - 1)) == 0) {\n    const double inv = 1.0 / n;",
      "  if ((nx & (nx - 1)) == 0) {\n    const double inv = 1.0 / (n - 1);", "tests/test_mergekit_program.py"),
    M("whole-sums-drop-the-last-segments-groups", "core kernels", "csrc/mergekit_program.cpp",
      "    for (uint64_t t = 0; t < res->tasks; ++t) {\n      const std::vector<float>& v = last_levels",
      "    for (uint64_t t = 0; t + 1 < res->tasks; ++t) {\n      const std::vector<float>& v = last_levels",
      "tests/test_mergekit_program.py"),
    M("pwrite-retry-resends-from-the-start", "core I/O", "csrc/io.cpp",
      "r = ::pwrite(fd, p + done, req,", "r = ::pwrite(fd, p, req,", "tests/test_core.py"),
    M("pread-retry-rereads-into-the-start", "core I/O", "csrc/io.cpp",
      "ssize_t r = ::pread(fd, p + done, req,", "ssize_t r = ::pread(fd, p, req,", "tests/test_core.py"),
    M("copy-file-range-retry-from-the-start", "core I/O", "csrc/io.cpp",
      "loff_t so = static_cast<loff_t>(src_off + done);", "loff_t so = static_cast<loff_t>(src_off);",
      "tests/test_core.py"),
    M("cross-device-copy-is-an-error", "core I/O", "csrc/io.cpp",
      "if (e == EXDEV || e == ENOSYS", "if (e == ENOSYS", "tests/test_core.py"),
    M("header-length-may-pass-the-end", "core I/O", "csrc/io.cpp",
      "  if (n > size_ - 8)\n", "  if (n > size_)\n", "tests/test_core.py", "tests/test_hostile.py"),
    M("blend-ignores-the-first-weight", "core kernels", "csrc/kernels.cpp",
      "for (size_t j = 0; j < m; ++j) acc[j] = w * Elem<D>::load(p, j);",
      "for (size_t j = 0; j < m; ++j) acc[j] = Elem<D>::load(p, j);", "tests/test_core.py"),
    M("bf16-rounds-half-up", "core kernels", "csrc/numerics.hpp",
      "(u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16", "(u + UINT32_C(0x8000)) >> 16", "tests/test_core.py"),
    M("row-mav-divides-by-cols-plus-one", "core kernels", "csrc/kernels.cpp",
      "out_[e * rows_ + r] = acc_[e] / static_cast<double>(cols_);",
      "out_[e * rows_ + r] = acc_[e] / static_cast<double>(cols_ + 1);", "tests/test_core.py"),
    M("row-mav-without-abs", "core kernels", "csrc/kernels.cpp",
      "d[j] = std::fabs(Elem<D>::load(p, j) - b[j]);", "d[j] = Elem<D>::load(p, j) - b[j];",
      "tests/test_core.py"),
    M("row-mav-vector-block-sums-add-columns-out-of-order", "core kernels", "csrc/kernels.cpp",
      "for (size_t c = 0; c < 4; ++c) s = _mm256_add_ps(s, _mm256_permute2f128_ps(u[c], u[c + 4], 0x20));\n"
      "  for (size_t c = 0; c < 4; ++c) s = _mm256_add_ps(s, _mm256_permute2f128_ps(u[c], u[c + 4], 0x31));",
      "for (size_t c = 0; c < 4; ++c) s = _mm256_add_ps(s, _mm256_permute2f128_ps(u[c], u[c + 4], 0x31));\n"
      "  for (size_t c = 0; c < 4; ++c) s = _mm256_add_ps(s, _mm256_permute2f128_ps(u[c], u[c + 4], 0x20));",
      "tests/test_core.py"),
    M("ties-trim-drops-ties-at-the-threshold", "core kernels", "csrc/ties_merge.cpp",
      "const uint32_t keep = 0u - static_cast<uint32_t>((db & kAbsMask) >= thr);",
      "const uint32_t keep = 0u - static_cast<uint32_t>((db & kAbsMask) > thr);", "tests/test_ties_core.py"),
    M("ties-sum-instead-of-mean", "core kernels", "csrc/ties_merge.cpp",
      "const int32_t c = cnt[j] > 0 ? cnt[j] : 1;", "const int32_t c = 1;", "tests/test_ties_core.py"),
    M("mk-rank-keeps-one-tie-too-many-where-the-band-ends", "core kernels", "csrc/mergekit_program.cpp",
      "d[j] = k >= first && k < last ? 1.f : 0.f;", "d[j] = k >= first && k <= last ? 1.f : 0.f;",
      "tests/test_mergekit_program.py"),
    M("mk-rank-block-of-ties-kept-when-it-ends-on-the-band", "core kernels", "csrc/mergekit_program.cpp",
      "if (at >= first && at + count <= last) {", "if (at >= first && at + count <= last + 1) {",
      "tests/test_mergekit_program.py"),
    M("mk-float64-sum-forgets-where-the-last-block-left-its-lanes", "core kernels", "csrc/mergekit_program.cpp",
      "for (; j < m && (seen + j) % 8 != 0; ++j) lane[(seen + j) % 8] += static_cast<double>(x[j]);",
      "for (; j < m && (seen + j) % 8 != 0; ++j) lane[j % 8] += static_cast<double>(x[j]);",
      "tests/test_mergekit_program.py"),
    M("mk-mask-edge-bytes-stored-not-ored", "core kernels", "csrc/mergekit_program.cpp",
      "    if (take == 8) *at = byte;", "    if (take > 0) *at = byte;",
      "tests/test_mergekit_program.py::test_a_kept_mask_reads_back_what_was_drawn_over_rows_that_split_its_bytes"),
    M("mk-mask-out-simd-packs-its-words-overlapping", "core kernels", "csrc/mergekit_program.cpp",
      "         << (16 * q);", "         << (8 * q);",
      "tests/test_mergekit_program.py::test_a_kept_mask_reads_back_what_was_drawn_over_rows_that_split_its_bytes"),
    M("mk-mask-in-simd-reads-the-wrong-quarter", "core kernels", "csrc/mergekit_program.cpp",
      "static_cast<__mmask16>(w >> (16 * q))", "static_cast<__mmask16>(w >> (8 * q))",
      "tests/test_mergekit_program.py::test_a_kept_mask_reads_back_what_was_drawn_over_rows_that_split_its_bytes"),
    M("mk-phase-pieces-share-the-first-piece's-registers", "core kernels", "csrc/mergekit_program.cpp",
      "  float* const regs = c.regs + off;", "  float* const regs = c.regs;",
      "tests/test_mergekit_program.py::test_della_masks_are_the_numpy_rows"),
    M("mk-della-counted-ranks-give-equal-magnitudes-one-rank", "core kernels", "csrc/mergekit_program.cpp",
      "rank[j] = hist[keys[j]]++;", "rank[j] = hist[keys[j]];",
      "tests/test_mergekit_program.py::test_della_masks_are_the_numpy_rows"),
    M("mk-della-counted-ranks-bin-by-the-high-16-bits", "core kernels", "csrc/mergekit_program.cpp",
      "const int shift = __builtin_ctz(all_or);", "const int shift = 16;",
      "tests/test_mergekit_program.py::test_della_masks_are_the_numpy_rows"),
    M("mk-whole-norms-added-as-workers-finish", "core kernels", "csrc/mergekit_program.cpp",
      "if (!turns.wait(t)) return;", "if (false) return;",
      "tests/test_mergekit_program.py::test_whole_norms_over_segments_are_torchs_one_norm"),
    M("mk-variance-of-two-updates-the-mean-by-a-third", "core kernels", "csrc/mergekit_program.cpp",
      "const double mean1 = mean0 + delta * 0.5;", "const double mean1 = mean0 + delta / 3.0;",
      "tests/test_mergekit_program.py::test_population_variance_is_torchs"),
    M("mk-variance-first-update-halves-the-mean", "core kernels", "csrc/mergekit_program.cpp",
      "    mean[j] = 0.0 + v;\n", "    mean[j] = 0.5 * v;\n",
      "tests/test_mergekit_program.py::test_population_variance_is_torchs"),
    M("mk-keep-mapped-past-the-bound", "core kernels", "csrc/mergekit_program.cpp",
      "keep = keep && in_bytes <= kKeepMappedBytes;", "keep = keep && in_bytes <= 4 * kKeepMappedBytes;",
      "tests/test_mapped_inputs.py::test_a_pass_keeps_its_pages_mapped_for_the_pass_that_writes"),
    M("chunk-reader-keeps-nothing", "core kernels", "csrc/chunk_reader.cpp",
      "      if (keep_) continue;\n", "",
      "tests/test_mapped_inputs.py::test_a_pass_keeps_its_pages_mapped_for_the_pass_that_writes"),
    M("mk-task-histogram-keeps-one-bin-too-many", "core kernels", "csrc/mergekit_program.cpp",
      "const bool fits = bins.size() <= kTaskBins;", "const bool fits = bins.size() <= kTaskBins + 1;",
      "tests/test_mergekit_program.py"),
]


# ---------------------------------------------------------------------------------- the run

def sh(cmd: list[str], cwd: Path, timeout: float | None = None, env: dict[str, str] | None = None,
       log: Path | None = None) -> tuple[int, str]:
    """Run ``cmd``; (exit status, output). A command past ``timeout`` is killed with its group
    and reported as status -9."""
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as p:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            out, _ = p.communicate()
            if log:
                log.write_text(out)
            return -9, out
    if log:
        log.write_text(out)
    return p.returncode, out


def tree_files(root: Path) -> list[str]:
    """The working tree as git sees it: tracked files and untracked ones that are not ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout
    return [f for f in out.decode().split("\0") if f and (root / f).is_file()]


def prepare(workdir: Path) -> Path:
    """A copy of the working tree and of .venv in ``workdir/tree``, installed editable there."""
    tree = workdir / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    for entry in tree.iterdir():  # keep the environment and the build directory between runs
        if entry.name not in (".venv", ".venv-stamp", "build"):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for f in tree_files(ROOT):
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tree / f)
    if not (ROOT / ".venv" / "bin" / "python").exists():
        sys.exit("error: no .venv here: run `bash scripts/setup.sh --test` first")
    # the packages the copy was made with: one installed here since (mergekit, say) means a fresh copy
    stamp = tree / ".venv-stamp"
    packages = "\n".join(sorted(p.name for p in (ROOT / ".venv").glob("lib/*/site-packages/*")))
    if not (tree / ".venv" / "bin" / "python").exists() or not stamp.exists() or stamp.read_text() != packages:
        print(f"copying .venv into {tree} ...", flush=True)
        shutil.rmtree(tree / ".venv", ignore_errors=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(ROOT / ".venv"), str(tree / ".venv")], check=True)
        stamp.write_text(packages)
    rebuild(tree)
    return tree


def rebuild(tree: Path) -> tuple[int, str]:
    """(Re)install the copy editable: the extension is rebuilt from its csrc, incrementally."""
    return sh([str(tree / ".venv/bin/python"), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
               "-e", "."], tree, timeout=1800)


def pytest_env() -> dict[str, str]:
    env = dict(os.environ)
    # A mutated and the restored source can have the same size and mtime second: cached
    # bytecode would then run the mutant on. Write none.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("LAYERSWAP_CLI_FUZZ_RANDOM", None)
    return env


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float, log: Path) -> tuple[int, str]:
    cmd = [str(tree / ".venv/bin/python"), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return sh(cmd, tree, timeout=timeout, env=pytest_env(), log=log)


def first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return m.group(1) if m else "?"


def check_snippets(mutants: list[Mutant], tree: Path) -> list[str]:
    problems = []
    for m in mutants:
        path = tree / m.file
        n = path.read_text().count(m.old) if path.exists() else -1
        if n != 1:
            problems.append(f"{m.name}: the snippet occurs {n if n >= 0 else 'no file,'} times in {m.file}")
    names = [m.name for m in MUTANTS]
    problems += [f"{n}: listed twice" for n in set(names) if names.count(n) > 1]
    return problems


def run_one(m: Mutant, tree: Path, logs: Path, timeout: float) -> tuple[str, str]:
    """(verdict, detail): killed / survived / stale / no build."""
    path = tree / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        return "stale", "snippet not found exactly once"
    path.write_text(original.replace(m.old, m.new))
    try:
        if m.is_cpp:
            rc, out = rebuild(tree)
            if rc != 0:
                (logs / f"{m.name}.build.log").write_text(out)
                return "no build", "the mutated core did not compile"
        rc, out = run_tests(tree, m.tests, timeout, logs / f"{m.name}.first.log")
        if rc == 1:
            return "killed", first_failure(out)
        if rc == -9:
            return "killed", "timeout (a hang)"
        if rc != 0:
            return "error", f"pytest exit {rc} on {' '.join(m.tests)}"
        rc, out = run_tests(tree, (), timeout * 6, logs / f"{m.name}.suite.log")
        if rc == 1:
            return "killed", first_failure(out) + " (whole suite)"
        if rc == -9:
            return "killed", "timeout in the whole suite"
        return ("survived", "the whole suite passed") if rc == 0 else ("error", f"pytest exit {rc}")
    finally:
        path.write_text(original)
        if m.is_cpp:
            rebuild(tree)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutants by area and exit")
    ap.add_argument("--check", action="store_true", help="only check that every snippet applies")
    ap.add_argument("--only", help="comma-separated mutant names")
    ap.add_argument("--baseline", action="store_true", help="run the whole suite unmutated first")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the first tests of a mutant")
    args = ap.parse_args()
    mutants = MUTANTS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m.name for m in MUTANTS})
        if unknown:
            sys.exit(f"error: unknown mutants: {', '.join(unknown)}")
        mutants = [m for m in MUTANTS if m.name in wanted]
    if args.list:
        for area in dict.fromkeys(m.area for m in mutants):
            print(f"{area}:")
            for m in mutants:
                if m.area == area:
                    print(f"  {m.name:<42} {m.file}")
        print(f"{len(mutants)} mutants")
        return 0
    problems = check_snippets(mutants, ROOT)
    for p in problems:
        print(f"stale: {p}")
    if args.check or problems:
        print(f"{len(mutants) - len(problems)} of {len(mutants)} mutants apply")
        return 1 if problems else 0

    tree = prepare(args.workdir)
    logs = args.workdir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    if args.baseline:
        rc, out = run_tests(tree, (), args.timeout * 6, logs / "baseline.log")
        if rc != 0:
            print(f"the unmutated suite fails (exit {rc}): {first_failure(out)}; see {logs / 'baseline.log'}")
            return 1
        print("baseline: the unmutated suite passes", flush=True)
    results = []
    start = time.monotonic()
    for i, m in enumerate(mutants, 1):
        t0 = time.monotonic()
        verdict, detail = run_one(m, tree, logs, args.timeout)
        results.append((m, verdict, detail))
        print(f"[{i:>2}/{len(mutants)}] {verdict:<8} {m.name:<42} {detail}  ({time.monotonic() - t0:.0f} s)",
              flush=True)
    killed = sum(v == "killed" for _, v, _ in results)
    print(f"\nmutation score: {killed}/{len(results)} killed ({100 * killed / len(results):.0f}%) "
          f"in {(time.monotonic() - start) / 60:.1f} min; logs in {logs}")
    for m, v, d in results:
        if v != "killed":
            print(f"  {v}: {m.name} ({m.area}, {m.file}): {d}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
