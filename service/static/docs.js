// Swagger UI for /docs.json, served from this server (BentoML's bundled copy): no CDN;
// validatorUrl null, so it never calls validator.swagger.io; BaseLayout, whose markup needs
// no inline style (the standalone layout's top bar does, and the CSP refuses it).
"use strict";

window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/docs.json",
    dom_id: "#swagger-ui",
    validatorUrl: null,
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
