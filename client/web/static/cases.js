// The cases page: past cases with their status, filtered by status, and the CSV export.
"use strict";

const imageUrls = [];

async function thumbnail(caseId) {
  const image = document.createElement("img");
  image.className = "thumbnail";
  image.alt = "case image";
  try {
    const blob = await (await api("/api/cases/" + caseId + "/image")).blob();
    const url = URL.createObjectURL(blob);
    imageUrls.push(url);
    image.src = url;
  } catch (error) {
    image.alt = error.message;
  }
  return image;
}

async function loadCases() {
  const status = document.getElementById("status").value;
  const errorLine = document.getElementById("cases-error");
  errorLine.textContent = "";
  try {
    const answer = await (await api("/api/cases" + (status ? "?status=" + status : ""))).json();
    const counts = answer.counts;
    document.getElementById("counts").textContent =
      "pending " + counts.pending + ", confirmed " + counts.confirmed + ", corrected " + counts.corrected;
    while (imageUrls.length) URL.revokeObjectURL(imageUrls.pop());
    const body = document.querySelector("#cases-table tbody");
    body.replaceChildren();
    for (const item of answer.cases) {
      const row = body.insertRow();
      row.dataset.caseId = item.case_id;
      row.insertCell().textContent = item.created_at.replace("T", " ").slice(0, 19);
      const imageCell = row.insertCell();
      row.insertCell().textContent = item.created_by;
      row.insertCell().textContent = item.predicted_label + " " + formatPercent(item.probabilities[item.predicted_label]);
      const statusCell = row.insertCell();
      statusCell.textContent = item.status;
      statusCell.className = "case-status status-" + item.status;
      row.insertCell().textContent = item.label || "";
      row.insertCell().textContent = item.note || "";
      row.insertCell().textContent = item.reviewed_by || "";
      row.insertCell().textContent = item.model_version;
      thumbnail(item.case_id).then((image) => imageCell.append(image));
    }
  } catch (error) {
    errorLine.textContent = error.message;
  }
}

document.getElementById("status").addEventListener("change", loadCases);
document.getElementById("export-csv").addEventListener("click", async () => {
  try {
    const response = await api("/api/cases.csv");
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = "skin-fl-cases.csv";
    link.click();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  } catch (error) {
    document.getElementById("cases-error").textContent = error.message;
  }
});

setUpSignIn(async () => {
  document.getElementById("cases-section").hidden = false;
  await loadCases();
});
