// The map of one geoseg run: its raster layers from this server's tiles, one shown at a time
// (the classes first, at full opacity), the polygons on demand, and the legend.
(async () => {
  const get = async (url) => (await fetch(url)).json();
  const [run, legend] = await Promise.all([get("/run.json"), get("/legend.json")]);
  document.title = `geoseg view: ${run.name}`;
  document.getElementById("title").textContent = run.name;
  const [west, south, east, north] = run.bounds;
  const map = new maplibregl.Map({
    container: "map",
    bounds: [[west, south], [east, north]],
    fitBoundsOptions: { padding: 24 },
    attributionControl: false,
    style: {
      version: 8,
      sources: {},
      layers: [{ id: "background", type: "background", paint: { "background-color": "#eef0f2" } }],
    },
  });
  window.geoseg = { map, run };
  map.addControl(new maplibregl.NavigationControl(), "top-left");
  map.addControl(new maplibregl.ScaleControl(), "bottom-left");

  const rows = document.querySelector("#legend tbody");
  for (const row of legend) {
    const tr = rows.insertRow();
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = row.color;
    tr.insertCell().appendChild(swatch);
    tr.insertCell().textContent = row.name;
    tr.insertCell().textContent = row.km2 == null ? "" : row.km2.toFixed(2);
  }

  map.on("load", () => {
    const choices = document.getElementById("layers");
    run.layers.forEach((layer, i) => {
      map.addSource(layer.name, { type: "raster", url: `/${layer.name}/tilejson.json`, tileSize: 256 });
      map.addLayer({
        id: layer.name,
        type: "raster",
        source: layer.name,
        layout: { visibility: i === 0 ? "visible" : "none" },
        paint: { "raster-resampling": "nearest", "raster-opacity": 1, "raster-fade-duration": 0 },
      });
      const label = document.createElement("label");
      const input = Object.assign(document.createElement("input"), { type: "radio", name: "layer", value: layer.name, checked: i === 0 });
      label.append(input, ` ${layer.title}`);
      input.addEventListener("change", () => {
        for (const other of run.layers) {
          map.setLayoutProperty(other.name, "visibility", other.name === layer.name ? "visible" : "none");
        }
      });
      choices.appendChild(label);
      choices.appendChild(document.createElement("br"));
    });
    if (run.polygons) addPolygons(map);
  });

  function addPolygons(map) {
    document.getElementById("polygons-toggle").hidden = false;
    const toggle = document.getElementById("polygons");
    map.addSource("polygons", { type: "geojson", data: { type: "FeatureCollection", features: [] } });
    map.addLayer({ id: "polygons-fill", type: "fill", source: "polygons", paint: { "fill-opacity": 0 } });
    map.addLayer({ id: "polygons-line", type: "line", source: "polygons", paint: { "line-color": "#ffffff", "line-width": 1 } });
    const refresh = async () => {
      if (!toggle.checked || map.getZoom() < 11) {
        map.getSource("polygons").setData({ type: "FeatureCollection", features: [] });
        return;
      }
      const b = map.getBounds();
      map.getSource("polygons").setData(await get(`/polygons.geojson?bbox=${[b.getWest(), b.getSouth(), b.getEast(), b.getNorth()]}`));
    };
    toggle.addEventListener("change", refresh);
    map.on("moveend", refresh);
    map.on("click", "polygons-fill", (event) => {
      const table = document.createElement("table");
      for (const [key, value] of Object.entries(event.features[0].properties)) {
        const tr = table.insertRow();
        tr.insertCell().textContent = key;
        tr.insertCell().textContent = value;
      }
      new maplibregl.Popup().setLngLat(event.lngLat).setDOMContent(table).addTo(map);
    });
  }
})();
