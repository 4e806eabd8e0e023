// Picking a finding swaps the activation map in place (the form still works without script).
(function () {
  const select = document.getElementById("cam-select");
  const image = document.getElementById("cam-image");
  const name = document.getElementById("cam-name");
  if (!select || !image) return;
  select.addEventListener("change", () => {
    const base = image.getAttribute("src").replace(/cam-\d+\.png$/, "");
    image.src = `${base}cam-${select.value}.png`;
    image.alt = `${select.options[select.selectedIndex].text} activation map with the attention box`;
    if (name) name.textContent = select.options[select.selectedIndex].text;
    history.replaceState(null, "", `?cam=${select.value}`);
  });
})();
