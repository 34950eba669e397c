// Draws an analysis (analyze.py's --json, POST /analyze's answer) into an element: the text coloured by how
// surprised the model was by each token, a tooltip with the token's probability and the likeliest alternatives,
// and the cells that track a feature of the text, one of which recolours the text by its activation (blue for
// negative, red for positive). analyze.py inlines this file into its HTML report; the server's page loads it
// from /analysis.js. One span per token; its index is the token's position in data.positions. Everything is
// inside one function, so that only renderAnalysis joins the page's names.
(() => {
  "use strict";

  const ANALYSIS_MAX_BITS = 8;  // a surprise of this many bits or more gets the strongest colour
  const ANALYSIS_STYLE = `
    .an-summary { margin: 0.5rem 0; }
    .an-note { color: #8a5a00; }
    .an-cells { display: flex; flex-wrap: wrap; gap: 0.3rem; margin: 0.5rem 0; }
    .an-cells button { font: 0.8rem ui-monospace, Menlo, Consolas, monospace; padding: 0.25rem 0.5rem;
      border: 1px solid #888; border-radius: 4px; background: transparent; color: inherit; cursor: pointer; }
    .an-cells button[aria-pressed="true"] { border-color: #2458c6; background: #2458c6; color: #fff; }
    .an-text { font: 0.95rem/1.5 ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap;
      overflow-wrap: anywhere; padding: 0.75rem; border: 1px solid #c8c8c8; border-radius: 6px; color: #111;
      background: #fff; }
    .an-text span { cursor: default; }
    .an-text span:hover { outline: 1px solid #333; }
    .an-tip { position: fixed; z-index: 10; pointer-events: none; padding: 0.4rem 0.6rem; max-width: 22rem;
      font: 0.8rem/1.4 ui-monospace, Menlo, Consolas, monospace; white-space: pre; color: #fff;
      background: rgba(20, 20, 20, 0.92); border-radius: 5px; }
    .an-legend { font-size: 0.8rem; color: #666; margin: 0.3rem 0; }
    .an-lines { font-size: 0.85rem; }
    .an-lines code { white-space: pre-wrap; }
  `;

  // A token as the tooltip and the lists show it: quoted, with line breaks and tabs visible.
  function shownToken(token) {
    return JSON.stringify(token);
  }

  // White for a sure prediction, deep red for one of ANALYSIS_MAX_BITS bits or more.
  function surpriseColour(bits) {
    if (bits === null) return "#e4e4e4";  // the first token is only read
    const t = Math.min(bits / ANALYSIS_MAX_BITS, 1);
    return `hsl(6, 85%, ${Math.round(100 - 48 * t)}%)`;
  }

  // Blue (-1) through white (0) to red (+1), for an activation divided by the cell's largest magnitude.
  function activationColour(value) {
    const t = Math.max(-1, Math.min(1, value));
    const fade = Math.round(255 * (1 - Math.abs(t)));
    return t >= 0 ? `rgb(255, ${fade}, ${fade})` : `rgb(${fade}, ${fade}, 255)`;
  }

  function tipText(entry) {
    if (entry.probability === null) return `${shownToken(entry.token)}: the first token, only read`;
    const lines = [`${shownToken(entry.token)}: p = ${entry.probability} (${entry.bits} bits)`, "likeliest:"];
    for (const [token, p] of entry.alternatives) lines.push(`  ${shownToken(token).padEnd(8)} ${p}`);
    return lines.join("\n");
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // The tokens as spans (words joined by spaces at word level, as the text reads).
  function tokenSpans(data) {
    const box = element("div", "an-text"), fragment = document.createDocumentFragment();
    data.positions.forEach((entry, i) => {
      if (data.level === "word" && i > 0 && entry.token !== "\n" && data.positions[i - 1].token !== "\n") {
        fragment.append(" ");
      }
      const span = element("span", "", entry.token);
      span.dataset.i = i;
      span.style.backgroundColor = surpriseColour(entry.bits);
      fragment.append(span);
    });
    box.append(fragment);
    return box;
  }

  function summaryOf(data) {
    const part = element("div", "an-summary");
    part.append(element("div", "", `${data.tokens.toLocaleString()} ${data.level === "word" ? "words" : "characters"}, ` +
      `${data.bits_per_token.toFixed(4)} bits per token; cells of layer ${data.layer} of ${data.layers} ` +
      `(${data.state}, ${data.units} units)`));
    if (data.positions.length < data.tokens) {
      part.append(element("div", "an-note", `The report shows the first ${data.positions.length.toLocaleString()} ` +
        `tokens; the bits per token, the lines and the cells cover the whole text.`));
    }
    return part;
  }

  function surprisingLines(data) {
    const list = element("ol", "an-lines");
    for (const line of data.surprising_lines) {
      const item = element("li", "", `line ${line.line}, ${line.bits_per_token} bits/token: `);
      item.append(element("code", "", line.text));
      list.append(item);
    }
    return list;
  }

  // Hovering a span shows its tooltip next to the pointer (one listener for every span).
  function attachTooltip(box, data) {
    let tip = document.getElementById("an-tip");  // one for the page, however many times it is drawn
    if (!tip) {
      tip = element("div", "an-tip");
      tip.id = "an-tip";
      tip.hidden = true;
      document.body.append(tip);
    }
    box.addEventListener("mouseover", (event) => {
      const i = event.target.dataset && event.target.dataset.i;
      if (i === undefined) return;
      tip.textContent = tipText(data.positions[Number(i)]);
      tip.hidden = false;
    });
    box.addEventListener("mousemove", (event) => {
      tip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 4)}px`;
      const below = event.clientY + 16;  // under the pointer, or above it near the window's bottom
      tip.style.top = `${below + tip.offsetHeight <= window.innerHeight ? below : event.clientY - tip.offsetHeight - 8}px`;
    });
    box.addEventListener("mouseleave", () => { tip.hidden = true; });
    return tip;
  }

  // Colour every span by surprise (cell null) or by the cell's activation after reading its token.
  function recolour(box, data, cell, legend) {
    const spans = box.querySelectorAll("span[data-i]");
    if (cell === null) {
      spans.forEach((span) => { span.style.backgroundColor = surpriseColour(data.positions[span.dataset.i].bits); });
      legend.textContent = `colour: surprise, white (sure) to red (${ANALYSIS_MAX_BITS} bits or more); ` +
        "hover a character for its probability and the likeliest alternatives";
      return;
    }
    const values = cell.activations;
    const scale = Math.max(1e-6, ...values.map(Math.abs));
    spans.forEach((span) => {
      const i = Number(span.dataset.i);
      span.style.backgroundColor = i < values.length ? activationColour(values[i] / scale) : "#e4e4e4";
    });
    legend.textContent = `colour: cell ${cell.cell}'s ${data.state} after each token, blue (-${scale.toFixed(2)}) ` +
      `to red (+${scale.toFixed(2)}); best feature: ${cell.feature}, r = ${cell.r}`;
  }

  function cellPicker(box, data, legend) {
    const picker = element("div", "an-cells");
    const choose = (button, cell) => {
      picker.querySelectorAll("button").forEach((b) => b.setAttribute("aria-pressed", String(b === button)));
      recolour(box, data, cell, legend);
    };
    const surprise = element("button", "", "surprise");
    surprise.type = "button";
    surprise.addEventListener("click", () => choose(surprise, null));
    picker.append(surprise);
    for (const cell of data.cells) {
      const sign = cell.r >= 0 ? "+" : "";
      const button = element("button", "", `cell ${cell.cell}: ${cell.feature} ${sign}${cell.r.toFixed(2)}`);
      button.type = "button";
      button.dataset.cell = cell.cell;
      button.addEventListener("click", () => choose(button, cell));
      picker.append(button);
    }
    return { picker, reset: () => choose(surprise, null) };
  }

  window.renderAnalysis = function renderAnalysis(container, data) {
    if (!document.getElementById("an-style")) {
      const style = element("style", "", ANALYSIS_STYLE);
      style.id = "an-style";
      document.head.append(style);
    }
    container.replaceChildren();
    const box = tokenSpans(data), legend = element("div", "an-legend");
    const { picker, reset } = cellPicker(box, data, legend);
    container.append(summaryOf(data), element("div", "an-legend", "cells that track a feature (choose one):"),
                     picker, legend, box, element("h3", "", "most surprising lines"), surprisingLines(data));
    attachTooltip(box, data);
    reset();
  };
})();
