// Drag and drop onto the upload zone: the dropped files become the form's files and it is sent.
(function () {
  const zone = document.getElementById("drop-zone");
  const input = document.getElementById("file-input");
  const form = document.getElementById("upload-form");
  if (!zone || !input || !form) return;
  ["dragenter", "dragover"].forEach((e) => zone.addEventListener(e, (ev) => { ev.preventDefault(); zone.classList.add("over"); }));
  ["dragleave", "drop"].forEach((e) => zone.addEventListener(e, (ev) => { ev.preventDefault(); zone.classList.remove("over"); }));
  zone.addEventListener("drop", (ev) => {
    if (!ev.dataTransfer || !ev.dataTransfer.files.length) return;
    input.files = ev.dataTransfer.files;
    form.submit();
  });
  input.addEventListener("change", () => {
    const n = input.files.length;
    zone.querySelector("span").textContent = n ? `${n} file${n > 1 ? "s" : ""} chosen` : "Drop radiographs here, or choose files";
  });
})();
