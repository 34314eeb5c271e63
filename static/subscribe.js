/*! subscribe.js: sign-up forms that answer in place. No dependencies, no cookies.
 *
 *   <form data-newsletter="weekly" method="post"
 *         action="https://news.example.org/v1/subscriptions">
 *     <label for="nl-email">Email address *</label>
 *     <input id="nl-email" type="email" name="email" required autocomplete="email">
 *     <input type="hidden" name="newsletters" value="weekly">
 *     <button type="submit">Subscribe</button>
 *   </form>
 *   <script src="https://news.example.org/static/subscribe.js" defer></script>
 *
 * Without scripts the form posts as it is and the service answers with a page. With this
 * script the form posts JSON in place (the site's origin must be in the newsletter's allowed
 * origins) and shows the service's messages: errors next to their fields, announced by an
 * aria-live region, focus on the first one; the success message in the same region.
 * Several newsletters: checkboxes named "newsletters"; data-newsletter may also hold a list.
 * Messages in the site's own words: data-message-<code> on the form, where <code> is
 * pending, active, invalid-email, required, unknown-newsletter, rate-limited or error.
 */
(function () {
  "use strict";
  if (!window.fetch || !window.URL || !window.JSON || !Element.prototype.closest) {
    return; // the plain form post still works
  }
  var script = document.currentScript;
  var scriptOrigin = null;
  try {
    if (script && script.src) scriptOrigin = new URL(script.src, location.href).origin;
  } catch (e) { /* keep null */ }
  var ENDPOINT = "/v1/subscriptions";
  // form_ts and the challenge widget's token are the service's bot checks (docs/abuse.md).
  var FIELDS = [
    "email", "name", "language", "website", "form_ts",
    "challenge_token", "cf-turnstile-response", "h-captcha-response"
  ];
  var counter = 0;

  function endpoint(form) {
    var action = form.getAttribute("action");
    var url = action ? new URL(action, location.href) : null;
    if (url && url.pathname.slice(-ENDPOINT.length) === ENDPOINT) return url.href;
    return new URL(ENDPOINT, scriptOrigin || location.href).href;
  }

  function newsletters(form) {
    var inputs = form.querySelectorAll('[name="newsletters"]');
    if (!inputs.length) {
      return (form.getAttribute("data-newsletter") || "").split(/[\s,]+/).filter(Boolean);
    }
    var chosen = [];
    Array.prototype.forEach.call(inputs, function (input) {
      if (input.type === "checkbox" || input.type === "radio") {
        if (input.checked) chosen.push(input.value);
      } else if (input.value) {
        chosen.push(input.value);
      }
    });
    return chosen;
  }

  function payload(form) {
    var body = { newsletters: newsletters(form) };
    FIELDS.forEach(function (name) {
      var field = form.elements.namedItem(name);
      if (field && typeof field.value === "string" && (field.value || name === "email")) {
        body[name] = field.value;
      }
    });
    return body;
  }

  function override(form, code) {
    return code ? form.getAttribute("data-message-" + String(code).replace(/_/g, "-")) : null;
  }

  function statusRegion(form) {
    var region = form.querySelector("[data-newsletter-status]");
    if (!region) {
      region = document.createElement("div");
      region.setAttribute("data-newsletter-status", "");
      form.appendChild(region);
    }
    region.setAttribute("role", "status");
    region.setAttribute("aria-live", "polite");
    region.setAttribute("tabindex", "-1");
    return region;
  }

  function fieldFor(form, name) {
    if (name === "newsletters") {
      var box = form.querySelector('[name="newsletters"]:not([type="hidden"])');
      if (!box) return null;
      return { anchor: box.closest("fieldset") || box, focus: box };
    }
    var field = form.elements.namedItem(name);
    if (!field || !field.type || field.type === "hidden") return null;
    return { anchor: field, focus: field };
  }

  function describe(element, id, add) {
    var ids = (element.getAttribute("aria-describedby") || "").split(/\s+/).filter(function (x) {
      return x && x !== id;
    });
    if (add) ids.push(id);
    if (ids.length) element.setAttribute("aria-describedby", ids.join(" "));
    else element.removeAttribute("aria-describedby");
  }

  function clearErrors(form) {
    Array.prototype.forEach.call(form.querySelectorAll("[data-newsletter-error]"), function (note) {
      var owner = form.querySelector('[data-newsletter-invalid="' + note.id + '"]');
      if (owner) {
        describe(owner, note.id, false);
        owner.removeAttribute("aria-invalid");
        owner.removeAttribute("data-newsletter-invalid");
      }
      note.parentNode.removeChild(note);
    });
  }

  function showFieldError(form, field, message) {
    var note = document.createElement("p");
    note.id = "nl-error-" + (++counter);
    note.className = "nl-error error";
    note.setAttribute("data-newsletter-error", "");
    note.textContent = message;
    if (field.anchor.tagName === "FIELDSET") {
      field.anchor.appendChild(note);
    } else {
      field.anchor.insertAdjacentElement("afterend", note);
    }
    field.anchor.setAttribute("aria-invalid", "true");
    field.anchor.setAttribute("data-newsletter-invalid", note.id);
    describe(field.anchor, note.id, true);
  }

  function setBusy(form, busy) {
    form.setAttribute("aria-busy", busy ? "true" : "false");
    var buttons = form.querySelectorAll('button:not([type]), [type="submit"]');
    Array.prototype.forEach.call(buttons, function (button) {
      button.disabled = busy;
    });
  }

  function say(region, text, hidden) {
    region.textContent = text;
    // Messages already shown by their fields are for screen readers only here.
    var style = region.style;
    if (hidden) {
      style.position = "absolute";
      style.width = style.height = "1px";
      style.overflow = "hidden";
      style.clip = "rect(0 0 0 0)";
      style.whiteSpace = "nowrap";
    } else {
      style.position = style.width = style.height = style.overflow = "";
      style.clip = style.whiteSpace = "";
    }
  }

  function succeed(form, region, answer) {
    var body = answer.body || {};
    var code = body.status === "active" ? "active" : "pending";
    form.reset();
    form.setAttribute("data-newsletter-done", "");
    say(region, override(form, code) || body.message || "Thank you.", false);
    region.focus();
    form.dispatchEvent(new CustomEvent("newsletter:subscribed", { bubbles: true, detail: body }));
  }

  function fail(form, region, answer) {
    var body = answer.body || {};
    var errors = Array.isArray(body.errors) ? body.errors : [];
    var messages = [];
    var unplaced = false;
    var first = null;
    errors.forEach(function (error) {
      var message = override(form, error.code) || error.message || body.title;
      if (error.suggestion) {
        message += " " + (form.getAttribute("data-message-suggestion") || "Did you mean") +
          " " + error.suggestion + "?";
      }
      var field = fieldFor(form, error.field);
      if (field && !field.anchor.hasAttribute("data-newsletter-invalid")) {
        showFieldError(form, field, message);
        first = first || field.focus;
      } else {
        unplaced = true;
      }
      messages.push(message);
    });
    if (!errors.length) {
      var code = answer.status === 429 ? "rate-limited" : "error";
      messages.push(
        override(form, code) || body.title || "Something went wrong. Please try again."
      );
      unplaced = true;
    }
    say(region, messages.join(" "), !unplaced);
    if (first) first.focus();
    else region.focus();
  }

  // A form of the site's own lacks the signed time it was shown (form_ts): fetch one now, as
  // the page loads, into a hidden field, so the plain post carries it too.
  function fetchFormToken(form) {
    if (form.elements.namedItem("form_ts")) return;
    var url = new URL(endpoint(form));
    url.pathname = url.pathname.slice(0, -ENDPOINT.length) + "/v1/form-token";
    url.search = "";
    fetch(url.href, { mode: "cors", credentials: "omit", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (body) {
        if (!body || typeof body.form_ts !== "string" || form.elements.namedItem("form_ts")) {
          return;
        }
        var input = document.createElement("input");
        input.type = "hidden";
        input.name = "form_ts";
        input.value = body.form_ts;
        form.appendChild(input);
      }, function () { /* without it the service decides; nothing to show here */ });
  }

  function enhance(form) {
    if (form.hasAttribute("data-newsletter-ready")) return;
    form.setAttribute("data-newsletter-ready", "");
    form.noValidate = true; // the service's messages, in one voice, instead of the browser's
    fetchFormToken(form);
    var region = statusRegion(form);
    var sending = false;
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      if (sending) return;
      sending = true;
      setBusy(form, true);
      clearErrors(form);
      form.removeAttribute("data-newsletter-done");
      var request = fetch(endpoint(form), {
        method: "POST",
        mode: "cors",
        credentials: "omit",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(payload(form)),
      });
      request
        .then(function (response) {
          return response.json().then(
            function (body) { return { status: response.status, body: body }; },
            function () { return { status: response.status, body: null }; }
          );
        })
        .then(
          function (answer) {
            sending = false;
            setBusy(form, false);
            if (answer.status === 200 || answer.status === 202) succeed(form, region, answer);
            else fail(form, region, answer);
          },
          function () {
            // Not reachable from here (offline, or this site is not an allowed origin):
            // the plain form post still works, so hand over to it.
            sending = false;
            setBusy(form, false);
            HTMLFormElement.prototype.submit.call(form);
          }
        );
    });
  }

  function enhanceAll(root) {
    Array.prototype.forEach.call(
      (root || document).querySelectorAll("form[data-newsletter]"), enhance
    );
  }

  window.NewsletterSubscribe = { enhance: enhance, enhanceAll: enhanceAll };
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { enhanceAll(); });
  } else {
    enhanceAll();
  }
})();
