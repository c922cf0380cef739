// Shared by the pages: the access token (kept for this browser tab only) and authorised calls to the API.
"use strict";

const TOKEN_KEY = "skin-fl-token";

function storedToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {}, { Authorization: "Bearer " + storedToken() });
  const response = await fetch(path, Object.assign({}, options, { headers: headers }));
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try {
      const body = await response.json();
      if (body.error && body.error.message) message = body.error.message;
    } catch (ignored) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function formatPercent(value) {
  return (100 * value).toFixed(1) + " %";
}

// Sign in with a token, then call onSignedIn(user); a stored, still valid token signs in at once.
function setUpSignIn(onSignedIn) {
  const section = document.getElementById("sign-in-section");
  const form = document.getElementById("sign-in-form");
  const errorLine = document.getElementById("sign-in-error");
  async function tryToken() {
    const response = await api("/api/me");
    const body = await response.json();
    document.getElementById("signed-in").textContent = "Signed in as " + body.user;
    section.hidden = true;
    await onSignedIn(body.user);
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    errorLine.textContent = "";
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    try {
      await tryToken();
    } catch (error) {
      sessionStorage.removeItem(TOKEN_KEY);
      errorLine.textContent = error.message;
    }
  });
  if (storedToken()) {
    tryToken().catch(() => sessionStorage.removeItem(TOKEN_KEY));
  }
}
