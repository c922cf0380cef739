// The classify page: upload images, show probabilities, flag and Grad-CAM overlay, save the clinician's label.
"use strict";

let modelInfo = null;

const originalUrls = [];

function renderResult(result, file) {
  const node = document.getElementById("result-template").content.firstElementChild.cloneNode(true);
  const fileName = file.name;
  node.dataset.caseId = result.case_id;
  const originalUrl = URL.createObjectURL(file);
  originalUrls.push(originalUrl);
  node.querySelector(".original").src = originalUrl;
  node.querySelector(".overlay").src = "data:image/jpeg;base64," + result.overlay_jpeg_base64;
  node.querySelector(".top-class").textContent = modelInfo.class_names[result.top_class] + " (" + result.top_class + ")";
  node.querySelector(".top-probability").textContent = formatPercent(result.top_probability);
  node.querySelector(".flag").hidden = !result.malignant;
  node.querySelector(".upload-name").textContent = fileName + " - malignant classes together: " + formatPercent(result.malignant_probability);
  const rows = node.querySelector(".probabilities tbody");
  const ordered = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [name, value] of ordered) {
    const row = rows.insertRow();
    row.insertCell().textContent = modelInfo.class_names[name] + " (" + name + ")";
    const cell = row.insertCell();
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.round(120 * value) + "px";
    cell.append(bar, formatPercent(value));
  }
  const select = node.querySelector(".label-select");
  for (const name of modelInfo.classes) {
    const option = new Option(modelInfo.class_names[name] + " (" + name + ")", name, false, name === result.top_class);
    select.add(option);
  }
  const status = node.querySelector(".feedback-status");
  node.querySelector(".feedback-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    status.textContent = "Saving…";
    try {
      const response = await api("/api/cases/" + result.case_id + "/feedback", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ label: select.value, note: node.querySelector(".note").value }),
      });
      const saved = await response.json();
      status.textContent = "Saved: " + saved.status + " as " + saved.label;
      status.className = "feedback-status status-" + saved.status;
    } catch (error) {
      status.textContent = error.message;
      status.className = "feedback-status error";
    }
  });
  return node;
}

async function onSignedIn() {
  document.getElementById("classify-section").hidden = false;
  modelInfo = await (await api("/api/model")).json();
  document.getElementById("model-info").textContent =
    "Model " + modelInfo.version + (modelInfo.ensemble_size > 1 ? " (ensemble of " + modelInfo.ensemble_size + ")" : "");
}

document.getElementById("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const files = document.getElementById("files").files;
  const errorLine = document.getElementById("upload-error");
  const busy = document.getElementById("busy");
  errorLine.textContent = "";
  const body = new FormData();
  for (const file of files) body.append("files", file);
  busy.hidden = false;
  try {
    const response = await api("/api/classify", { method: "POST", body: body });
    const answer = await response.json();
    const results = document.getElementById("results");
    while (originalUrls.length) URL.revokeObjectURL(originalUrls.pop());
    results.replaceChildren(...answer.results.map((result) => renderResult(result, files[result.upload_position])));
  } catch (error) {
    errorLine.textContent = error.message;
  } finally {
    busy.hidden = true;
  }
});

setUpSignIn(onSignedIn);
