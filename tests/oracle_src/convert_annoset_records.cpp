// convert_annoset's per-record path: ReadRichImageToAnnotatedDatum + set_type, one file per line
#include <fstream>
#include <map>
#include <string>
#include "caffe/proto/caffe.pb.h"
#include "caffe/util/io.hpp"
int main(int argc, char** argv) {
  // root list labelmap encode_type is_color resize_height resize_width outdir [label_type]
  std::string root = argv[1], encode_type = argv[4], out = argv[8];
  std::string label_type = argc > 9 ? argv[9] : "xml";
  bool is_color = std::string(argv[5]) == "1";
  int rh = atoi(argv[6]), rw = atoi(argv[7]);
  caffe::LabelMap label_map;
  caffe::ReadProtoFromTextFile(argv[3], &label_map);
  std::map<std::string, int> name_to_label;
  caffe::MapNameToLabel(label_map, true, &name_to_label);
  std::ifstream infile(argv[2]);
  std::string filename, labelname;
  int line_id = 0;
  while (infile >> filename >> labelname) {
    caffe::AnnotatedDatum anno_datum;
    bool ok = caffe::ReadRichImageToAnnotatedDatum(root + filename, root + labelname, rh, rw, 0, 0,
        is_color, encode_type, caffe::AnnotatedDatum_AnnotationType_BBOX, label_type, name_to_label, &anno_datum);
    anno_datum.set_type(caffe::AnnotatedDatum_AnnotationType_BBOX);
    std::string bytes;
    anno_datum.SerializeToString(&bytes);
    std::ofstream o(out + "/rec_" + std::to_string(line_id++) + (ok ? ".bin" : ".failed"), std::ios::binary);
    o << bytes;
  }
  return 0;
}
