"""The HTML evaluation report of `mmjax eval --report DIR`.

    mmjax eval --workdir RUN --report OUT      # then open OUT/index.html in a browser

`write_report` writes `OUT/index.html`, a self-contained page (no server, no
scripts, no network) with PNG files beside it (`OUT/media/`, `OUT/curves.png`,
relative links: copy the folder as a whole). It holds, in order:

- Run: step, model (`config.model.name`), recipe when known, the eval data of
  each evaluator that ran, the media kind and the date;
- Metrics: the key/value pairs of `eval/step_<N>.json` (table `id="metrics"`,
  floats with 4 decimals, as `mmjax eval` prints them);
- Training curves: the training loss of `RUN/metrics.jsonl` and the eval
  metrics of `RUN/eval/step_*.json` over steps (`curves.png`); a line says why
  when there are none (e.g. `--hf` weights have no run folder);
- Zero-shot: the confusion matrix (a table up to 40 classes, a heat-map image
  beyond), the most confused class pairs and a few misclassified held-out
  examples with their predicted and true class;
- Retrieval: for a few captions their top-5 images, for a few images their
  top-5 captions, each marked hit (the caption's own image, or of its group) or miss;
- Captioning: media, generated caption and reference;
- VQA: media, question, prediction, reference answer, correct or not;
- Grounding: the map drawn over the image, the phrase, hit or miss.

Each evaluator's section appears when its details are given; hits green, misses
red; audio as spectrograms, video by its first frame, else a text placeholder.
"""
from __future__ import annotations

import dataclasses
import datetime
import html
import json
import logging
import os
from html.parser import HTMLParser
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger("mmjax")

MEDIA_DIR = "media"
CURVES = "curves.png"
MAX_CONFUSION_TABLE = 40   # classes; a heat-map image above
THUMB_SIDE = 160           # thumbnails larger than this are shrunk (pixels, longer side)

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;
 line-height:1.35}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;
 margin-top:1.6em}h3{font-size:1em}
table{border-collapse:collapse;margin:.4em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.cm td,table.cm th{padding:.1em .3em;font-size:.8em;text-align:center}
table.cm th.row{text-align:left}
img.thumb{width:96px;height:auto;image-rendering:pixelated;display:block}
img.big{width:192px;height:auto;image-rendering:pixelated;display:block}
.hit{color:#1a7f1a}.miss{color:#c62020}
td.hit,td.miss{font-weight:600}div.hit{border:3px solid #1a7f1a}div.miss{border:3px solid #c62020}
ol{margin:0;padding-left:1.4em}
.cell{display:inline-block;margin:2px;padding:2px;text-align:center;font-size:.8em}
.placeholder{display:inline-block;width:96px;padding:1em 0;background:#eee;color:#666;
 text-align:center;font-size:.8em}
.note{color:#666;font-style:italic}
"""


# ---------------------------------------------------------------- media


def preview(x: Any, mean: Sequence[float] = (0.0, 0.0, 0.0),
            std: Sequence[float] = (1.0, 1.0, 1.0)) -> Optional[np.ndarray]:
    """A uint8 `[h, w, 3]` picture of one media row of an eval batch, or None.

    `x`: an image `[H, W, 3]` (float32 normalized as `(pixels / 255 - mean) / std`,
    or uint8 pixels), a video `[T, H, W, 3]` (its first frame), or an audio
    waveform `[num_samples]` (a log-magnitude spectrogram, low frequencies at
    the bottom). Anything else gives None (shown as a placeholder).
    """
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[-1] == 3:
        x = x[0]
    if x.ndim == 3 and x.shape[-1] == 3:
        if x.dtype == np.uint8:
            return x
        x = x.astype(np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
        return (np.clip(x, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    if x.ndim == 1 and x.size >= 256 and np.issubdtype(x.dtype, np.floating):
        return _spectrogram(x.astype(np.float32))
    return None


def _spectrogram(wave: np.ndarray, frame: int = 256, hop: int = 128) -> np.ndarray:
    """uint8 `[frame // 2 + 1, T, 3]` grey log-magnitude spectrogram of a waveform."""
    n = 1 + (len(wave) - frame) // hop
    frames = np.lib.stride_tricks.sliding_window_view(wave, frame)[::hop][:n]
    mag = np.abs(np.fft.rfft(frames * np.hanning(frame).astype(np.float32), axis=-1))
    db = 20 * np.log10(np.maximum(mag, 1e-6)).T[::-1]                   # [F, T]
    lo = max(float(db.max()) - 80.0, float(db.min()))
    grey = np.clip((db - lo) / max(float(db.max()) - lo, 1e-6), 0, 1)
    return np.repeat((grey * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)


class _Media:
    """Writes the page's PNG files under `out_dir/media/` and returns their tags."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.names: set[str] = set()

    def img(self, name: str, picture: Optional[np.ndarray], alt: str, cls: str = "thumb") -> str:
        """`<img>` of uint8 `[H, W, 3]` (or `[H, W]`) `picture` saved as media/NAME.png;
        a placeholder when `picture` is None."""
        if picture is None:
            return f'<span class="placeholder" title="{_e(alt)}">no preview</span>'
        from PIL import Image
        pic = np.asarray(picture)
        if pic.dtype != np.uint8:
            pic = (np.clip(pic.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
        im = Image.fromarray(pic)
        if max(im.size) > THUMB_SIDE:
            im.thumbnail((THUMB_SIDE, THUMB_SIDE))
        rel = f"{MEDIA_DIR}/{name}.png"
        os.makedirs(os.path.join(self.out_dir, MEDIA_DIR), exist_ok=True)
        im.save(os.path.join(self.out_dir, rel))
        self.names.add(rel)
        return f'<img class="{cls}" src="{rel}" alt="{_e(alt)}" title="{_e(alt)}">'


# ---------------------------------------------------------------- html helpers


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def format_value(v: Any) -> str:
    """A metric value as `mmjax eval` prints it: floats with 4 decimals."""
    return f"{v:.4f}" if isinstance(v, float) else f"{v}"


def _table(rows: Iterable[Sequence[Any]], header: Sequence[str] = (), table_id: str = "",
           cls: str = "") -> str:
    """A table of already-escaped cell HTML (`(html, td_class)` pairs or plain html)."""
    out = [f"<table{f' id={chr(34)}{table_id}{chr(34)}' if table_id else ''}"
           f"{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}>"]
    if header:
        out.append("<thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        cells = []
        for c in row:
            body, klass = c if isinstance(c, tuple) else (c, "")
            cells.append(f'<td class="{klass}">{body}</td>' if klass else f"<td>{body}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _mark(ok: Optional[bool]) -> tuple[str, str]:
    if ok is None:
        return "n/a", ""
    return ("hit", "hit") if ok else ("miss", "miss")


# ---------------------------------------------------------------- sections


def _run_section(results: Mapping[str, Any], details: Mapping[str, Any], config: Any,
                 workdir: Optional[str], step: int, info: Mapping[str, Any]) -> str:
    rows = [("step", _e(step))]
    if config is not None:
        rows.append(("model", _e(config.model.get("name", "?"))))
    for k, v in info.items():
        rows.append((_e(k), _e(v)))
    if workdir:
        rows.append(("run folder", _e(workdir)))
    evals = config.get("evals") if config is not None else None
    names = [n for n in ("zeroshot", "retrieval", "captioning", "vqa", "grounding")
             if n in details or any(k.startswith(f"{n}/") for k in results)]
    for n in names:
        section = evals.get(n) if evals is not None else None
        if section is None:
            continue
        what = f"shards={section.get('shards')}"
        if section.get("max_samples"):
            what += f", max_samples={section.get('max_samples')}"
        rows.append((f"eval data: {_e(n)}", _e(what)))
    if details.get("media_kind"):
        rows.append(("media", _e(details["media_kind"])))
    rows.append(("date", _e(datetime.datetime.now().astimezone().isoformat(timespec="seconds"))))
    return "<h2>Run</h2>" + _table(rows, table_id="run-info")


def _metrics_section(results: Mapping[str, Any], step: int) -> str:
    saved = {"step": step, **results}
    rows = [(_e(k), (_e(format_value(v)), "num")) for k, v in sorted(saved.items())]
    return "<h2>Metrics</h2>" + _table(rows, ("metric", "value"), table_id="metrics")


def _read_curves(workdir: str) -> tuple[list[tuple[int, float]], dict[int, dict]]:
    """(training loss `[(step, loss)]` from metrics.jsonl, `{step: eval results}` from
    eval/step_*.json) of a run folder (missing files give empty ones)."""
    from mmjax import workdir as wd
    loss: list[tuple[int, float]] = []
    path = wd.join(workdir, "metrics.jsonl")
    if wd.exists(path):
        for line in wd.read_text(path).splitlines():
            try:
                row = json.loads(line)
                loss.append((int(row["step"]), float(row["loss"])))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short, or a row without a loss
    evals: dict[int, dict] = {}
    folder = wd.join(workdir, "eval")
    if wd.isdir(folder):
        if wd.is_remote(folder):
            import fsspec
            fs = fsspec.core.url_to_fs(folder)[0]
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
        else:
            names = os.listdir(folder)
        for name in names:
            n = name.removeprefix("step_").removesuffix(".json")
            if name.startswith("step_") and name.endswith(".json") and n.isdigit():
                try:
                    evals[int(n)] = json.loads(wd.read_text(wd.join(folder, name)))
                except ValueError:
                    continue
    return sorted(loss), dict(sorted(evals.items()))


def _figure(size: tuple[float, float]):
    """A matplotlib figure on the Agg canvas (no pyplot: no global figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _plotted(key: str, value: Any) -> bool:
    """Eval keys drawn over steps: scores, not counts or the `top1` alias."""
    last = key.rsplit("/", 1)[-1]
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
            and key != "top1" and last not in ("n", "count", "num_classes", "n_images",
                                               "n_texts"))


def _curves_section(out_dir: str, workdir: Optional[str]) -> str:
    head = "<h2>Training curves</h2>"
    if not workdir:
        return head + ('<p class="note" id="curves-note">No training curves: these weights were '
                       "not trained by an mmjax run (e.g. <code>--hf</code>), so there is no run "
                       "folder with metrics.jsonl.</p>")
    loss, evals = _read_curves(workdir)
    series: dict[str, list[tuple[int, float]]] = {}
    for s, res in evals.items():
        for k, v in res.items():
            if _plotted(k, v):
                series.setdefault(k, []).append((s, float(v)))
    if not loss and not series:
        return head + (f'<p class="note" id="curves-note">No training curves: {_e(workdir)} has '
                       "no metrics.jsonl rows with a loss and no eval/step_*.json.</p>")
    panels = int(bool(loss)) + int(bool(series))
    fig = _figure((5.2 * panels, 3.4))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    i = 0
    if loss:
        ax = axes[i]
        i += 1
        ax.plot([s for s, _ in loss], [v for _, v in loss], color="tab:blue", lw=1.2)
        ax.set_title("training loss")
        ax.set_xlabel("step")
        ax.grid(alpha=.3)
    if series:
        ax = axes[i]
        for k, pts in sorted(series.items()):
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, lw=1, label=k)
        ax.set_title("eval metrics")
        ax.set_xlabel("step")
        ax.set_xlim(left=0, right=max(s for pts in series.values() for s, _ in pts)
                    + max(1, loss[-1][0] // 20 if loss else 1))
        ax.grid(alpha=.3)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, CURVES))
    note = []
    if not loss:
        note.append("metrics.jsonl has no loss rows")
    if not series:
        note.append("no eval/step_*.json")
    extra = f'<p class="note">{_e("; ".join(note))}.</p>' if note else ""
    return head + f'<img src="{CURVES}" alt="training curves" id="curves-img">' + extra


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 `[C, C]`: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def _zeroshot_section(d: Mapping[str, Any], media: _Media, out_dir: str) -> str:
    names = list(d["classnames"])
    pred, labels = np.asarray(d["predictions"]), np.asarray(d["labels"])
    cm = confusion_matrix(pred, labels, len(names))
    out = ["<h2>Zero-shot classification</h2>",
           f"<p>{len(labels)} held-out examples, {len(names)} classes; "
           f"{int(np.trace(cm))} correct. Rows: true class, columns: predicted class.</p>"]
    if len(names) <= MAX_CONFUSION_TABLE:
        totals = np.maximum(cm.sum(1, keepdims=True), 1)
        head = "<tr><th></th>" + "".join(
            f'<th title="{_e(n)}">{j}</th>' for j, n in enumerate(names)) + "</tr>"
        body = []
        for i, n in enumerate(names):
            cells = []
            for j in range(len(names)):
                frac = cm[i, j] / totals[i, 0]
                hue = "26,127,26" if i == j else "198,32,32"
                style = f' style="background:rgba({hue},{frac:.2f})"' if cm[i, j] else ""
                cells.append(f"<td{style}>{cm[i, j] or ''}</td>")
            body.append(f'<tr><th class="row">{i} {_e(n)}</th>' + "".join(cells) + "</tr>")
        out.append(f'<table id="confusion" class="cm"><thead>{head}</thead><tbody>'
                   + "".join(body) + "</tbody></table>")
    else:
        out.append(_heatmap(cm, out_dir, media))
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:10]
    pairs = [(int(k) // len(names), int(k) % len(names)) for k in flat if off.flat[k] > 0]
    out.append("<h3>Most confused pairs</h3>")
    if pairs:
        out.append(_table([(_e(names[t]), _e(names[p]), (str(off[t, p]), "num"))
                           for t, p in pairs], ("true", "predicted as", "count"),
                          table_id="confused-pairs"))
    else:
        out.append('<p class="note">No confusions.</p>')
    examples = d.get("examples") or []
    out.append("<h3>Misclassified examples</h3>")
    if not examples:
        out.append('<p class="note">None shown (no misclassified examples).</p>')
    rows = []
    for ex in examples:
        rows.append((media.img(f"zeroshot_{ex['index']}", ex.get("media"), f"#{ex['index']}"),
                     _e(ex["index"]), (_e(names[ex["prediction"]]), "miss"),
                     _e(names[ex["label"]])))
    if rows:
        out.append(_table(rows, ("media", "example", "predicted", "true"),
                          table_id="misclassified"))
    return "".join(out)


def _heatmap(cm: np.ndarray, out_dir: str, media: _Media) -> str:
    fig = _figure((6, 5))
    ax = fig.subplots()
    rows = np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(cm / rows, cmap="viridis", interpolation="nearest")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, fraction=.046)
    fig.tight_layout()
    os.makedirs(os.path.join(out_dir, MEDIA_DIR), exist_ok=True)
    rel = f"{MEDIA_DIR}/confusion.png"
    fig.savefig(os.path.join(out_dir, rel))
    media.names.add(rel)
    return (f'<img src="{rel}" alt="confusion matrix (row-normalized)" id="confusion-img">'
            '<p class="note">Row-normalized; class ids as in the class list, names of the most '
            "confused pairs below.</p>")


def _cell(inner: str, caption: str, ok: Optional[bool]) -> str:
    word, cls = _mark(ok)
    return (f'<div class="cell {cls}">{inner}<span class="{cls}">{_e(caption)} {word}</span>'
            "</div>")


def _retrieval_section(d: Mapping[str, Any], media: _Media, kind: Optional[str]) -> str:
    """Images (or audio / video clips) ranked for captions, and captions for them."""
    items = "images" if kind in (None, "image") else f"{kind} clips"
    item = items[:-1]
    t2i = np.asarray(d["text_to_image"])
    # Images of one group (evals.retrieval.group_key) are hits for each other's captions.
    g = np.asarray(d["groups"] if d.get("groups") is not None else np.arange(t2i.max() + 1))
    pics, caps = d.get("media", {}), d.get("captions", {})
    by = f" or one of its group ({_e(d['group_key'])})" if d.get("group_key") else ""
    out = ["<h2>Retrieval</h2>",
           f"<p>{len(np.unique(t2i)) if len(t2i) else 0} {items}, {len(t2i)} captions, ranked by "
           f"{_e(d.get('ranked_by', 'embedding similarity'))}. A hit is the caption's own "
           f"{item}{by}.</p>", f"<h3>Caption &rarr; top-5 {items}</h3>"]
    rows = []
    for q in d.get("text_to_image_queries", []):
        own = int(t2i[q["caption"]])
        cells = "".join(_cell(media.img(f"retrieval_image_{i}", pics.get(i), f"image {i}"),
                              f"#{r + 1}", g[i] == g[own]) for r, i in enumerate(q["top"]))
        rows.append((_e(caps.get(q["caption"], "")), cells, _mark((g[q["top"]] == g[own]).any()),
                     media.img(f"retrieval_image_{own}", pics.get(own), f"image {own}")))
    out.append(_table(rows, ("caption", f"top-5 {items}", "in top 5", f"its own {item}"),
                      table_id="retrieval-t2i"))
    out.append(f"<h3>{item.capitalize()} &rarr; top-5 captions</h3>")
    rows = []
    for q in d.get("image_to_text_queries", []):
        img = q["image"]
        items = "".join(
            f'<li class="{_mark(g[t2i[c]] == g[img])[1]}">{_e(caps.get(c, ""))} '
            f"({_mark(g[t2i[c]] == g[img])[0]})</li>" for c in q["top"])
        rows.append((media.img(f"retrieval_image_{img}", pics.get(img), f"image {img}"),
                     f"<ol>{items}</ol>", _mark((g[t2i[q['top']]] == g[img]).any())))
    out.append(_table(rows, (item, "top-5 captions", "in top 5"), table_id="retrieval-i2t"))
    return "".join(out)


def _captioning_section(d: Mapping[str, Any], media: _Media) -> str:
    preds, refs, pics = d["predictions"], d["references"], d.get("media", {})
    rows = [(media.img(f"caption_{i}", pics.get(i), f"example {i}"), _e(preds[i]), _e(refs[i]))
            for i in sorted(pics) if i < len(preds)]
    return ("<h2>Captioning</h2>" + f"<p>{len(preds)} examples; the first {len(rows)}:</p>"
            + _table(rows, ("media", "generated", "reference"), table_id="captioning"))


def _vqa_section(d: Mapping[str, Any], media: _Media) -> str:
    pics = d.get("media", {})
    shown = sorted(pics) if pics else list(range(min(8, len(d["prediction"]))))
    rows = []
    for i in shown:
        if i >= len(d["prediction"]):
            continue
        score = d["score"][i] if "score" in d else None
        word, cls = _mark(None if score is None else score >= 1.0)
        word = {"hit": "correct", "miss": "wrong"}.get(word, word)
        rows.append((media.img(f"vqa_{i}", pics.get(i), f"question {i}"), _e(d["question"][i]),
                     _e(d["prediction"][i]), _e(d["answer"][i]), (word, cls)))
    return ("<h2>Visual question answering</h2>"
            + f"<p>{len(d['prediction'])} questions; the first {len(rows)}:</p>"
            + _table(rows, ("media", "question", "prediction", "reference", "correct"),
                     table_id="vqa"))


def _grounding_section(d: Mapping[str, Any], media: _Media) -> str:
    rows = []
    for i, ex in enumerate(d.get("examples") or []):
        pic = ex.get("overlay")
        if pic is None:
            pic = ex.get("image")
        if pic is not None and ex.get("box") is not None:
            pic = _draw_box(np.asarray(pic), ex["box"])
        box = ex.get("box")
        rows.append((media.img(f"grounding_{i}", pic, ex.get("text", ""), cls="big"),
                     _e(ex.get("text", "")),
                     _e("" if box is None else ", ".join(f"{float(v):.4g}" for v in box)),
                     _mark(ex.get("hit"))))
    body = (_table(rows, ("map over media", "text", "box (x0, y0, x1, y1)", "pointing"),
                   table_id="grounding") if rows
            else '<p class="note">No grounding examples.</p>')
    return ("<h2>Grounding</h2><p>The map of where the model finds the text, drawn over the "
            "media; the box (when known) outlined. A hit: the map's maximum lies in the "
            "box.</p>" + body)


def _draw_box(pic: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """A copy of uint8 `[H, W, 3]` with a 1-pixel white rectangle at `box` (x0, y0, x1, y1)."""
    pic = np.array(pic, np.uint8, copy=True)
    h, w = pic.shape[:2]
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, x1 = sorted((min(max(x0, 0), w - 1), min(max(x1, 0), w - 1)))
    y0, y1 = sorted((min(max(y0, 0), h - 1), min(max(y1, 0), h - 1)))
    pic[y0, x0:x1 + 1] = pic[y1, x0:x1 + 1] = 255
    pic[y0:y1 + 1, x0] = pic[y0:y1 + 1, x1] = 255
    return pic


# ---------------------------------------------------------------- page


def write_report(out_dir: str, results: Mapping[str, Any], details: Mapping[str, Any], *,
                 config: Any = None, workdir: Optional[str] = None, step: int = 0,
                 info: Optional[Mapping[str, Any]] = None) -> str:
    """Writes `out_dir/index.html` (with `out_dir/media/*.png` and `curves.png`);
    returns the page's path.

    Args:
      out_dir: a local folder (created).
      results: the flat metrics of `run_evals` (what `eval/step_<N>.json` holds
        besides "step").
      details: per-example results, by evaluator (each key optional):
        "zeroshot": dict(predictions int [n] (top-1 class), labels int [n],
          classnames list[C], examples: [dict(index=int stream position,
          prediction=int, label=int, media=uint8 [H, W, 3] or None), ...]);
        "retrieval": dict(text_to_image int [M], optional groups int [N] and
          group_key (hits by group), text_to_image_queries:
          [dict(caption=int, top=[5 image ids])], image_to_text_queries:
          [dict(image=int, top=[5 caption ids])], media {image id: uint8 [H, W, 3]
          or None}, captions {caption id: str}, ranked_by str);
        "captioning": dict(predictions [n] str, references [n] str, media
          {example id: uint8 [H, W, 3] or None});
        "vqa": dict(prediction, answer, question, type: [q] lists, score [q]
          float, media {question id: uint8 [H, W, 3] or None});
        "grounding": dict(examples=[dict(image uint8 [H, W, 3], text str, map
          float32 [h, w], overlay uint8 [H, W, 3], box (x0, y0, x1, y1) or None,
          hit bool or None), ...]);
        "media_kind": "image", "audio" or "video".
      config: the run's config (model name, eval data), optional.
      workdir: the run folder whose metrics.jsonl and eval/step_*.json give the
        training curves; None (e.g. `--hf` weights): no curves.
      step: the evaluated step.
      info: extra `{name: value}` rows for the Run table (e.g. the recipe).
    """
    details = details or {}
    os.makedirs(out_dir, exist_ok=True)
    media = _Media(out_dir)
    run = _run_section(results, details, config, workdir, step, info or {})
    parts = [f'<section id="run">{run}</section>',
             f'<section id="scores">{_metrics_section(results, step)}</section>',
             f'<section id="curves">{_curves_section(out_dir, workdir)}</section>']
    writers = {"zeroshot": lambda d: _zeroshot_section(d, media, out_dir),
               "retrieval": lambda d: _retrieval_section(d, media, details.get("media_kind")),
               "captioning": lambda d: _captioning_section(d, media),
               "vqa": lambda d: _vqa_section(d, media),
               "grounding": lambda d: _grounding_section(d, media)}
    for name, write in writers.items():
        if details.get(name) is not None:
            parts.append(f'<section id="{name}">{write(details[name])}</section>')
    title = f"mmjax eval report, step {step}"
    if config is not None:
        title += f" ({config.model.get('name', '?')})"
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1>" + "\n".join(parts) + "</body></html>\n")
    path = os.path.join(out_dir, "index.html")
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    log.info("eval report: %s", path)
    return path


# ---------------------------------------------------------------- reading a page back


@dataclasses.dataclass
class ReportPage:
    """What `read_report` finds in a page: `tables` `{table id: rows}` (each row the
    text of its cells, whitespace collapsed, header rows included), `images` (every
    `<img>` src, in page order), `links` (every `<a>` href) and `sections` (the
    ids of the `<section>` elements, in order)."""
    tables: dict = dataclasses.field(default_factory=dict)
    images: list = dataclasses.field(default_factory=list)
    links: list = dataclasses.field(default_factory=list)
    sections: list = dataclasses.field(default_factory=list)


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.page = ReportPage()
        self._tables: list[Optional[str]] = []   # ids of the open tables (None: no id)
        self._cell: Optional[list[str]] = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._tables.append(attrs.get("id"))
            if attrs.get("id"):
                self.page.tables[attrs["id"]] = []
        elif tag == "tr" and self._tables and self._tables[-1]:
            self.page.tables[self._tables[-1]].append([])
        elif tag in ("td", "th") and self._tables and self._tables[-1] and self._cell is None:
            self._cell = []
        elif tag == "img":
            self.page.images.append(attrs.get("src"))
        elif tag == "a" and attrs.get("href") is not None:
            self.page.links.append(attrs["href"])
        elif tag == "section":
            self.page.sections.append(attrs.get("id"))

    def handle_endtag(self, tag):
        if tag == "table" and self._tables:
            self._tables.pop()
        elif tag in ("td", "th") and self._cell is not None and self._tables and self._tables[-1]:
            # Text of nested elements joined by a space, whitespace collapsed.
            self.page.tables[self._tables[-1]][-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def read_report(folder: str) -> ReportPage:
    """The tables, images, links and sections of `folder/index.html` (a page of
    `write_report`), e.g. `read_report(a).tables["metrics"]`."""
    parser = _PageParser()
    with open(os.path.join(folder, "index.html"), encoding="utf-8") as f:
        parser.feed(f.read())
    parser.close()
    return parser.page
